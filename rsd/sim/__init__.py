"""Simulation: the OpenVLA-OFT LIBERO contract and the LIBERO env.

- ``rsd.sim.protocol``  pure protocol functions and constants (no LIBERO import; cheap).
- ``rsd.sim.libero``    ``make_env`` / ``LiberoEnv`` / ``list_tasks`` / ``load_init_states``; LIBERO config
  and headless renderer selection. LIBERO itself is imported lazily, on first use.
- ``rsd.sim.experts``   scripted privileged experts.

Nothing is imported here so that ``import rsd.sim.protocol`` never pulls in MuJoCo or LIBERO.
"""

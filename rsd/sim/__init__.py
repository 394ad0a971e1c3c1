"""Simulation: the OpenVLA-OFT LIBERO contract, the LIBERO env and the episode loop.

- ``rsd.sim.protocol``  pure protocol functions and constants (no LIBERO import; cheap).
- ``rsd.sim.setup``     LIBERO's config file and the headless renderer, set up before LIBERO is imported.
- ``rsd.sim.libero``    ``make_env`` / ``LiberoEnv`` / ``list_tasks`` / ``load_init_states`` / ``make_observation``.
  LIBERO itself is imported lazily, on first use.
- ``rsd.sim.episode``   ``run_episode``: one protocol episode (``rsd eval`` and ``rsd collect`` both run it).
- ``rsd.sim.experts``   scripted privileged experts (``rsd.sim.task_plans``: their per-task plans).
- ``rsd.sim.demos``     LIBERO's HDF5 demonstration layout; ``rsd.sim.collect`` records episodes into it.

The simulator knows policies only through their protocol (``rsd.policy.protocol``), never model internals.
Nothing is imported here so that ``import rsd.sim.protocol`` never pulls in MuJoCo or LIBERO.
"""

"""The bounded, loud reset (rsd.sim.libero.reset_inner_env) on real LIBERO: it gives the observation LIBERO's own
`ControlEnv.reset` + `set_init_state` gives for the same init state. Runs LIBERO (about 30 s on 2 cores)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.sim

if importlib.util.find_spec("libero") is None:
    pytest.skip("LIBERO is not installed: run `bash scripts/setup.sh`", allow_module_level=True)

from rsd.sim import libero  # noqa: E402

SUITE, TASK, INIT_STATE = "libero_spatial", 0, 3


def test_reset_gives_the_observation_of_liberos_own_reset() -> None:
    with libero.make_env(SUITE, TASK, render=False) as ours:
        obs = ours.reset(INIT_STATE)
        raw_ours = ours.raw_obs
        sim_ours = np.array(ours.raw_env.get_sim_state())
    with libero.make_env(SUITE, TASK, render=False) as theirs:  # the same env seed: the same random draws
        theirs.raw_env.reset()  # LIBERO's ControlEnv.reset
        raw_theirs = theirs.raw_env.set_init_state(theirs.init_states[INIT_STATE])
        sim_theirs = np.array(theirs.raw_env.get_sim_state())
    np.testing.assert_array_equal(sim_ours, sim_theirs)
    assert sorted(raw_ours) == sorted(raw_theirs)
    for key in raw_ours:
        np.testing.assert_array_equal(np.asarray(raw_ours[key]), np.asarray(raw_theirs[key]), err_msg=key)
    np.testing.assert_array_equal(obs["state"], libero.make_observation(raw_theirs, with_images=False)["state"])

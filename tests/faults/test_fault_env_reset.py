"""LiberoEnv.reset must not go through LIBERO's `ControlEnv.reset`, whose `finally: continue` turns a persistent
error into an endless silent loop, makes a one-off error vanish and swallows Ctrl-C. Fakes stand in for LIBERO:
the wrapper's reset below is LIBERO's code verbatim (libero/libero/envs/env_wrapper.py, hf-libero)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rsd import errors
from rsd.errors import RSDError
from rsd.sim import libero as sim_libero
from rsd.sim.libero import LiberoEnv, TaskSpec

# what LIBERO's placement samplers raise (libero/libero/envs/regions/base_region_sampler.py)
RandomizationError = pytest.importorskip("robosuite.utils.errors", reason="robosuite is in the sim extra").RandomizationError

RAW_OBS = {"robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
           "robot0_gripper_qpos": np.zeros(2)}


class FakeInnerEnv:
    """The robosuite env inside LIBERO's wrapper: ``reset`` raises ``error`` on its first ``failures`` calls."""

    def __init__(self, error: BaseException | None, failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0

    def reset(self) -> dict[str, Any]:
        self.calls += 1
        if self.error is not None and self.calls <= self.failures:
            raise self.error
        return dict(RAW_OBS)


class FakeControlEnv:
    """LIBERO's ControlEnv as far as LiberoEnv.reset uses it."""

    def __init__(self, inner: FakeInnerEnv) -> None:
        self.env = inner
        self.init_state = None

    def reset(self):  # LIBERO's ControlEnv.reset, verbatim
        success = False
        while not success:
            try:
                ret = self.env.reset()
                success = True
            except RandomizationError:
                pass
            finally:
                continue

        return ret

    def set_init_state(self, init_state: np.ndarray) -> dict[str, Any]:
        self.init_state = init_state
        return dict(RAW_OBS)


def _env(inner: FakeInnerEnv) -> LiberoEnv:
    env = object.__new__(LiberoEnv)  # no LIBERO: the attributes __init__ would set
    env.task = TaskSpec("libero_spatial", 3, "name", "do it", "task.bddl", "task.pruned_init", 220)
    env.render, env.camera_size = False, 256
    env._init_states = np.arange(6, dtype=np.float64).reshape(2, 3)
    env.raw_env = FakeControlEnv(inner)
    env._raw_obs, env._steps, env._closed = None, 0, False
    return env


@pytest.mark.parametrize("failures", [1, 100], ids=["one-off", "persistent"])
def test_an_error_in_reset_surfaces_typed_with_its_cause(failures: int) -> None:
    inner = FakeInnerEnv(OSError("mesh file missing"), failures)
    with pytest.raises(RSDError, match=r"libero_spatial task 3.*OSError: mesh file missing") as info:
        _env(inner).reset(0)
    assert isinstance(info.value, errors.EnvResetError)
    assert isinstance(info.value.__cause__, OSError)
    assert inner.calls == 1  # not retried


def test_ctrl_c_during_reset_propagates() -> None:
    inner = FakeInnerEnv(KeyboardInterrupt(), 1)
    with pytest.raises(KeyboardInterrupt):
        _env(inner).reset(0)
    assert inner.calls == 1


def test_a_placement_failure_is_retried_and_the_reset_goes_on() -> None:
    inner = FakeInnerEnv(RandomizationError("Cannot place all objects ):"), 2)
    env = _env(inner)
    obs = env.reset(1)
    assert inner.calls == 3
    np.testing.assert_array_equal(env.raw_env.init_state, env.init_states[1])  # then the protocol's init state
    assert obs["state"].shape == (8,) and env.steps == 0


def test_placement_failures_are_retried_a_bounded_number_of_times() -> None:
    inner = FakeInnerEnv(RandomizationError("Cannot place all objects ):"), 10_000)
    with pytest.raises(RSDError, match=r"could not place the objects.*in 10 resets") as info:
        _env(inner).reset(0)
    assert isinstance(info.value.__cause__, RandomizationError)
    assert inner.calls == sim_libero.RESET_ATTEMPTS == 10

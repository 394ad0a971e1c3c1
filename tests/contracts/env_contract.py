"""The contract of an environment the episode loop runs (``rsd.sim.libero.LiberoEnv`` and the tests' stand-ins).

A concrete env joins with ``class TestMyEnv(EnvContract)``: it sets ``spec``, the ``ObservationSpec`` of what the
env returns (its cameras exactly when it renders; ``raw`` when it hands out its own observation dict), and
provides an ``env`` fixture. The contract:

- ``reset(i)`` returns one valid, unbatched observation (``rsd.observation``): no key outside the contract,
  the image keys exactly when rendered, ``state`` float32 ``[P]``, the object poses exactly when ``spec.objects``;
- ``step(action)`` with a valid env action returns ``(observation, done)`` with a valid observation and a bool;
- invalid actions (wrong shape, NaN/inf, not numeric) and init states out of range raise typed errors
  (``rsd.errors``);
- ``frame()`` is a uint8 ``[H, W, 3]`` image when rendered, a typed error otherwise;
- ``reset(i)`` twice gives the same observation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rsd.errors import ConfigError, DTypeError, NonFiniteError, RSDError, ShapeError
from rsd.observation import IMAGE_KEYS, OBJECT_NAMES, OBJECT_POSES, RAW, STATE, ObservationSpec
from rsd.sim import protocol

ENV_ACTION = np.array([0.1, 0.0, -0.1, 0.0, 0.0, 0.0, 1.0], np.float32)  # one row of a policy's chunk


class EnvContract:
    """Base test class; see the module docstring. Subclasses set ``spec`` and provide the ``env`` fixture."""

    spec: ObservationSpec
    init_state = 0

    def check_observation(self, obs: Any) -> None:
        assert isinstance(obs, dict), type(obs)
        known = {*IMAGE_KEYS, STATE, RAW, OBJECT_POSES, OBJECT_NAMES}
        assert set(obs) <= known, f"keys outside the observation contract: {sorted(set(obs) - known)}"
        assert (OBJECT_POSES in obs) == self.spec.objects == (OBJECT_NAMES in obs), "object poses exactly when declared"
        assert tuple(k for k in IMAGE_KEYS if k in obs) == self.spec.images, "images exactly when rendered"
        self.spec.validate(obs)
        assert obs[STATE].dtype == np.float32 and obs[STATE].shape == (self.spec.proprio_dim,)  # one, unbatched
        for key in self.spec.images:
            assert obs[key].shape == (self.spec.image_size, self.spec.image_size, 3), key

    def test_reset_returns_a_valid_observation(self, env: Any) -> None:
        self.check_observation(env.reset(self.init_state))

    @pytest.mark.parametrize("action", [protocol.dummy_action(), ENV_ACTION], ids=["dummy", "policy_row"])
    def test_step_returns_an_observation_and_a_bool(self, env: Any, action: np.ndarray) -> None:
        env.reset(self.init_state)
        out = env.step(action)
        assert isinstance(out, tuple) and len(out) == 2
        obs, done = out
        self.check_observation(obs)
        assert type(done) is bool

    @pytest.mark.parametrize("action, error", [
        (np.zeros(6), ShapeError),
        (np.zeros((8, 7)), ShapeError),
        (np.full(7, np.nan), NonFiniteError),
        (np.array([0, 0, 0, 0, 0, 0, np.inf]), NonFiniteError),
        (["open"] * 7, DTypeError),
    ], ids=["6_dims", "a_whole_chunk", "nan", "inf", "not_numeric"])
    def test_invalid_actions_raise_typed_errors(self, env: Any, action: Any, error: type) -> None:
        env.reset(self.init_state)
        with pytest.raises(error):
            env.step(action)

    def test_init_state_out_of_range_raises(self, env: Any) -> None:
        for index in (-1, 10**6):
            with pytest.raises(ConfigError, match="init_state_index"):
                env.reset(index)

    def test_frame_only_when_rendered(self, env: Any) -> None:
        env.reset(self.init_state)
        if self.spec.images:
            frame = env.frame()
            assert isinstance(frame, np.ndarray) and frame.dtype == np.uint8
            assert frame.ndim == 3 and frame.shape[-1] == 3
        else:
            with pytest.raises(RSDError, match="render"):
                env.frame()

    def test_reset_is_deterministic(self, env: Any) -> None:
        first = env.reset(self.init_state)
        first = {key: np.array(first[key]) for key in (*self.spec.images, STATE)}  # a copy: the env may reuse arrays
        again = env.reset(self.init_state)
        for key, value in first.items():
            np.testing.assert_array_equal(again[key], value, err_msg=key)

"""The contract of a policy (``rsd.policy.Policy``, docs/design.md), as a base test class.

A concrete policy joins with ``class TestMyPolicy(PolicyContract)``: it sets ``spec``, the ``ObservationSpec`` of what
the policy reads, and provides a ``policy`` fixture; it may override the ``observation`` fixture (default: a
seeded ``spec.fake``), the ``instruction`` fixture and ``required_keys`` (default: every key of ``spec``). The
contract:

- it is a ``Policy``; ``reset()`` then ``predict_chunk(observation, instruction)`` returns an ``ActionChunk`` whose
  actions are float32 ``[8, 7]`` (the OpenVLA-OFT chunk on LIBERO: 8 steps of dx, dy, dz, droll, dpitch, dyaw,
  gripper), finite, with the gripper in the env convention: -1 open, +1 close (0 only where the model's gripper
  is exactly 0.5: OpenVLA-OFT's binarisation, ``rsd.normalize.model_to_env_gripper``);
- ``info`` is plain data: ``json.dumps`` takes it, without NaN/inf;
- an observation that lacks a key the policy reads raises a typed error (``rsd.errors``) naming that key, and
  returns no action;
- after ``reset()``, the same observation gives the same chunk.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from rsd.errors import RSDError
from rsd.observation import RAW, STATE, ObservationSpec
from rsd.policy import ActionChunk, Policy

CHUNK_SHAPE = (8, 7)
ENV_GRIPPER = {-1.0, 0.0, 1.0}
INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"  # libero_spatial 0


class PolicyContract:
    """Base test class; see the module docstring. Subclasses set ``spec`` and provide the ``policy`` fixture."""

    spec: ObservationSpec

    def required_keys(self) -> tuple[str, ...]:
        return (*self.spec.images, STATE, *((RAW,) if self.spec.raw else ()))

    @pytest.fixture
    def observation(self) -> dict[str, Any]:
        return self.spec.fake(seed=0)

    @pytest.fixture
    def instruction(self) -> str:
        return INSTRUCTION

    def chunk(self, policy: Any, observation: dict[str, Any], instruction: str) -> ActionChunk:
        policy.reset()
        return policy.predict_chunk(observation, instruction)

    def test_is_a_policy(self, policy: Any) -> None:
        assert isinstance(policy, Policy)

    def test_predict_chunk_returns_env_ready_actions(self, policy: Any, observation: dict, instruction: str) -> None:
        chunk = self.chunk(policy, observation, instruction)
        assert isinstance(chunk, ActionChunk)
        actions = chunk.actions
        assert actions.dtype == np.float32 and actions.shape == CHUNK_SHAPE
        assert np.isfinite(actions).all()
        assert set(np.unique(actions[:, -1]).tolist()) <= ENV_GRIPPER, actions[:, -1]

    def test_info_is_json(self, policy: Any, observation: dict, instruction: str) -> None:
        info = self.chunk(policy, observation, instruction).info
        assert isinstance(info, dict)
        json.dumps(info, allow_nan=False)

    def test_a_missing_key_raises_a_typed_error_naming_it(self, policy: Any, observation: dict,
                                                          instruction: str) -> None:
        for key in self.required_keys():
            lacking = {k: v for k, v in observation.items() if k != key}
            policy.reset()
            with pytest.raises(RSDError, match=key):
                policy.predict_chunk(lacking, instruction)

    def test_same_observation_after_reset_gives_the_same_chunk(self, policy: Any, observation: dict,
                                                               instruction: str) -> None:
        first = self.chunk(policy, observation, instruction).actions
        np.testing.assert_array_equal(self.chunk(policy, observation, instruction).actions, first)

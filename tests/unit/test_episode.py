"""The episode loop (rsd.sim.episode) without LIBERO: the protocol's settle steps, the open-loop queue, max steps,
and episode errors returned, not raised."""

from __future__ import annotations

import numpy as np
import pytest

from rsd.observation import RAW
from rsd.policy.protocol import ActionChunk
from rsd.sim import protocol
from rsd.sim.episode import run_episode
from tests._fake_env import FakeEnv  # held to the env contract (tests/contracts)

pytestmark = pytest.mark.unit


class CountingPolicy:
    def __init__(self, chunk_len: int = 8, raise_on_call: int | None = None) -> None:
        self.chunk_len, self.raise_on_call = chunk_len, raise_on_call
        self.calls, self.resets, self.seen = 0, 0, []

    def reset(self) -> None:
        self.resets += 1

    def predict_chunk(self, observation, instruction):
        self.calls += 1
        self.seen.append(observation[RAW]["t"])  # FakeEnv: steps since the reset
        if self.calls == self.raise_on_call:
            raise ValueError("policy exploded")
        actions = np.zeros((self.chunk_len, 7), np.float32)
        actions[:, 0] = 0.1
        actions[:, 6] = self.calls  # tag the chunk
        return ActionChunk(actions=actions, info={})


def test_episode_loop_follows_the_protocol() -> None:
    env, policy, frames = FakeEnv(target=2.05, render=True), CountingPolicy(chunk_len=8), []
    out = run_episode(env, policy, "do it", 0, max_steps=220, on_frame=frames.append)
    assert out.success and out.error is None
    assert out.steps == 21  # 21 * 0.1 >= 2.05
    wait = np.stack(env.actions[: protocol.NUM_STEPS_WAIT])
    np.testing.assert_array_equal(wait, np.tile(protocol.dummy_action(), (protocol.NUM_STEPS_WAIT, 1)))
    assert policy.calls == 3 and policy.resets == 1  # open loop: queried only when the 8-action queue is empty
    assert policy.seen == [10, 18, 26]  # the obs after the wait, then after each executed chunk
    tags = [a[6] for a in env.actions[protocol.NUM_STEPS_WAIT:]]
    assert tags == [1] * 8 + [2] * 8 + [3] * 5
    assert len(frames) == out.steps + 1 and len(out.chunk_latencies_ms) == 3


def test_episode_loop_stops_at_max_steps() -> None:
    env, policy = FakeEnv(), CountingPolicy(chunk_len=5)
    out = run_episode(env, policy, "do it", 0, max_steps=12)
    assert (out.success, out.steps, policy.calls) == (False, 12, 3)
    assert len(env.actions) == protocol.NUM_STEPS_WAIT + 12


def test_policy_exception_is_returned_with_type_message_and_traceback() -> None:
    out = run_episode(FakeEnv(), CountingPolicy(raise_on_call=2), "do it", 0, max_steps=50)
    assert not out.success and out.steps == 8
    assert out.error == "ValueError: policy exploded"
    assert "predict_chunk" in out.traceback and isinstance(out.exception, ValueError)


def test_bad_chunk_shape_is_an_episode_error() -> None:
    class WrongDims(CountingPolicy):
        def predict_chunk(self, observation, instruction):
            return ActionChunk(actions=np.zeros((8, 6), np.float32), info={})

    out = run_episode(FakeEnv(), WrongDims(), "do it", 0, max_steps=5)
    assert out.error is not None and out.error.startswith("ShapeError")


def test_only_observations_a_policy_reads_carry_policy_images() -> None:
    """Settle steps but the last and the steps inside a chunk skip the image preprocessing (``images=False``); every
    observation handed to the policy has both views."""
    from rsd.observation import IMAGE_KEYS

    class ImagePolicy(CountingPolicy):
        def predict_chunk(self, observation, instruction):
            assert all(k in observation for k in IMAGE_KEYS), sorted(observation)
            return super().predict_chunk(observation, instruction)

    env, policy = FakeEnv(render=True), ImagePolicy(chunk_len=8)
    out = run_episode(env, policy, "do it", 0, max_steps=40)
    assert out.error is None and out.steps == 40 and policy.calls == 5
    assert env.unobserved_steps == (protocol.NUM_STEPS_WAIT - 1) + (40 - 5)  # 9 settle + 7 per chunk

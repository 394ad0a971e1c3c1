"""``LowDimBackbone(motion=True)``: the backbone reads ``state - previous_state`` (the proprio's motion since the
previous chunk began), remembers the previous encode's state, forgets it on ``reset``; training computes the same
feature from demos (``chunk_motion``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsd.backbones.lowdim import LowDimBackbone, lowdim_inputs
from rsd.errors import ConfigError, ShapeError
from rsd.train.policy_data import chunk_motion

pytestmark = pytest.mark.unit

NAMES = ("akita_black_bowl_1", "plate_1")
INSTRUCTION = "put the bowl on the plate"


def _obs(rng: np.random.Generator) -> dict:
    return {"state": rng.normal(size=8).astype(np.float32),
            "object_poses": rng.normal(size=(2, 7)).astype(np.float32), "object_names": NAMES}


def _backbone(motion: bool = True) -> LowDimBackbone:
    return LowDimBackbone(hidden_dim=32, width=16, layers=1, heads=2, word_buckets=64, motion=motion).eval()


def test_chunk_motion_is_the_state_change_since_the_previous_chunk_began():
    state = np.arange(20, dtype=np.float32)[:, None] ** 2 * np.ones((1, 3), np.float32)  # [T=20, P=3]
    motion = chunk_motion(state, 8)
    for t in range(20):
        np.testing.assert_array_equal(motion[t], state[t] - state[max(t - 8, 0)])
    assert (motion[0] == 0).all() and motion[8][0] == 64.0 and motion[19][0] == 19 ** 2 - 11 ** 2


@torch.inference_mode()
def test_encode_remembers_the_previous_state_and_reset_forgets_it():
    rng = np.random.default_rng(0)
    bb = _backbone()
    first, second = _obs(rng), _obs(rng)
    h1 = bb.encode(first, INSTRUCTION)
    h2 = bb.encode(second, INSTRUCTION)
    # the second call saw motion = second.state - first.state, exactly
    explicit = lowdim_inputs(second, INSTRUCTION, bb.observation_spec, bb.word_buckets,
                             torch.as_tensor(first["state"])[None], motion=True)
    torch.testing.assert_close(explicit.motion[0], torch.as_tensor(second["state"] - first["state"]))
    torch.testing.assert_close(h2, bb.forward_inputs(explicit), rtol=0, atol=0)
    # the motion reaches the hidden state: the same observation after another one encodes differently
    standing = lowdim_inputs(second, INSTRUCTION, bb.observation_spec, bb.word_buckets, motion=True)
    assert not torch.allclose(h2, bb.forward_inputs(standing))
    bb.reset()
    torch.testing.assert_close(bb.encode(first, INSTRUCTION), h1, rtol=0, atol=0)  # a new episode: zero motion


@torch.inference_mode()
def test_backbone_without_motion_is_stateless():
    rng = np.random.default_rng(1)
    bb = _backbone(motion=False)
    obs = _obs(rng)
    h = bb.encode(obs, INSTRUCTION)
    bb.encode(_obs(rng), INSTRUCTION)
    torch.testing.assert_close(bb.encode(obs, INSTRUCTION), h, rtol=0, atol=0)
    assert "motion" in bb.spec_kwargs() and bb.spec_kwargs()["motion"] is False


def test_motion_inputs_are_required_and_checked():
    rng = np.random.default_rng(2)
    bb = _backbone()
    no_motion = lowdim_inputs(_obs(rng), INSTRUCTION, bb.observation_spec, bb.word_buckets)
    with pytest.raises(ShapeError, match="motion"):
        bb.forward_inputs(no_motion)
    with pytest.raises(ShapeError, match="reset"):  # a previous state of another batch size
        lowdim_inputs(_obs(rng), INSTRUCTION, bb.observation_spec, bb.word_buckets, torch.zeros(2, 8), motion=True)
    objects, mask = np.zeros((4, 2, 10), np.float32), np.ones((4, 2), bool)
    with pytest.raises(ConfigError, match="motion"):
        bb.fit_input_stats(np.zeros((4, 8), np.float32), objects, mask)  # motion backbone, no motion array
    with pytest.raises(ConfigError, match="motion"):
        _backbone(motion=False).fit_input_stats(np.zeros((4, 8), np.float32), objects, mask, np.zeros((4, 8)))
    with pytest.raises(ConfigError, match="bool"):
        LowDimBackbone(motion=1)

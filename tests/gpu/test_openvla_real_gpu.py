"""Real OpenVLA-OFT weights: run only when RSD_OPENVLA_OFT_PATH names a local checkpoint directory
(e.g. a download of moojink/openvla-7b-oft-finetuned-libero-spatial); RSD_OPENVLA_OFT_SUITE picks the
suite (default libero_spatial)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rsd.observation import STATE, ObservationSpec

pytestmark = pytest.mark.gpu

PATH = os.environ.get("RSD_OPENVLA_OFT_PATH")
SUITE = os.environ.get("RSD_OPENVLA_OFT_SUITE", "libero_spatial")
needs_checkpoint = pytest.mark.skipif(
    not PATH, reason="set RSD_OPENVLA_OFT_PATH to a local OpenVLA-OFT checkpoint directory (no hub access here)")


@pytest.fixture(scope="module")
def oft():
    from rsd.backbones.openvla import OpenVLAOFTBackbone

    return OpenVLAOFTBackbone.from_pretrained(PATH, SUITE, device="cuda", local_files_only=True)


def _obs(seed: int = 0) -> dict:
    """Fake cameras and a LIBERO-like proprio vector (the arm above the table, gripper open)."""
    return {**ObservationSpec().fake(seed), STATE: np.array([-0.05, 0.0, 1.1, 3.1, 0.0, 0.0, 0.03, -0.03], np.float32)}


@needs_checkpoint
def test_real_checkpoint_loads_strictly_and_encodes(oft) -> None:
    from rsd.backbones.openvla_checkpoint import load_oft_state_dict

    files = load_oft_state_dict(Path(PATH), device=torch.device("cpu"))
    assert set(files) == set(oft.model.state_dict())
    hidden = oft.encode(_obs(), "pick up the black bowl between the plate and the ramekin and place it on the plate")
    assert hidden.shape == (1, 4096) and torch.isfinite(hidden).all()
    ids = oft.prompt_ids("pick up the black bowl")
    assert int(ids[0]) == 1 and int(ids[-1]) == 29871  # <s> ... "▁", as OFT


@needs_checkpoint
def test_real_l1_actions_fast_matches_eager(oft) -> None:
    text = "pick up the black bowl between the plate and the ramekin and place it on the plate"
    eager = oft.predict_actions(_obs(1), text)
    assert eager.shape == (1, 8, 7) and eager.abs().max() < 5  # normalized actions live near [-1, 1]
    oft.set_fast(True)
    try:
        fast = oft.predict_actions(_obs(1), text)
    finally:
        oft.set_fast(False)
    assert float((fast - eager).norm() / eager.norm()) < 1e-2

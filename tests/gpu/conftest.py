"""Fixtures for the GPU tests (the root conftest.py marks tests/gpu as `gpu` and skips them without CUDA)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    return torch.device("cuda")


@pytest.fixture(scope="session")
def shaped_7b(cuda: torch.device):
    """The random-weight OpenVLA-7B-shaped backbone in bf16 on the GPU (about 15.4 GB), eager."""
    from rsd.backbones.openvla_shaped import OpenVLAShapedBackbone

    return OpenVLAShapedBackbone("7b", device=cuda, seed=0)


@pytest.fixture(scope="session")
def rsd_parts_cpu():
    """Random RFSQ head, draft and tokenizer at the default RSDConfig sizes (float32, CPU)."""
    from rsd.config import RSDConfig
    from rsd.heads import DraftHead, RFSQHead
    from rsd.tokenizer import RFSQTokenizer

    cfg = RSDConfig()
    torch.manual_seed(0)
    return cfg, RFSQHead(cfg).eval(), DraftHead(cfg).eval(), RFSQTokenizer.from_config(cfg).eval()


@pytest.fixture(scope="session")
def shaped_7b_fast(cuda: torch.device, shaped_7b):
    """A second instance with the same seed (hence the same weights, checked), on the fast path."""
    from rsd.backbones.openvla_shaped import OpenVLAShapedBackbone

    backbone = OpenVLAShapedBackbone("7b", device=cuda, seed=0, fast=True)
    for name in ("projector.fc1.weight", "language_model.model.layers.31.mlp.down_proj.weight"):
        assert torch.equal(backbone.model.get_parameter(name), shaped_7b.model.get_parameter(name)), name
    return backbone

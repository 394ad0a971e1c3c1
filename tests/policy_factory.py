"""Build small RSD/L1 policies for tests (tiny sizes, fixed seeds)."""

from __future__ import annotations

import torch

from rsd.backbones import TinyBackbone
from rsd.config import RSDConfig
from rsd.heads import DraftHead, L1ActionHead, RFSQHead
from rsd.normalize import NormStats
from rsd.observation import ObservationSpec
from rsd.policy import L1Policy, RSDPolicy
from rsd.tokenizer import RFSQTokenizer

IMAGE = 32

ACTION_STATS = NormStats(q01=[-0.9, -0.8, -0.95, -0.1, -0.2, -0.3, 0.0],
                         q99=[0.9, 0.85, 0.95, 0.12, 0.2, 0.33, 1.0], mask=[True] * 6 + [False])


def tiny_config(hidden_dim: int = 32, **sizes: int) -> RSDConfig:
    """``RSDConfig.tiny`` with ``hidden_dim`` and any other ``sizes`` (e.g. ``chunk_len=8``, LIBERO's chunk)."""
    return RSDConfig.tiny(hidden_dim=hidden_dim, **sizes)


def fake_observation(seed: int = 0, image_size: int = IMAGE) -> dict:
    """A valid observation for the tiny policies (both cameras at ``image_size`` px, the 8-d state)."""
    return ObservationSpec(image_size=image_size).fake(seed)


def tiny_rsd_policy(backbone=None, *, speculative: bool = True, seed: int = 0, **sizes: int) -> RSDPolicy:
    torch.manual_seed(seed)
    backbone = backbone if backbone is not None else TinyBackbone(hidden_dim=32, image_size=IMAGE, width=16)
    cfg = tiny_config(backbone.hidden_dim, **sizes)
    return RSDPolicy(backbone, RFSQHead(cfg), RFSQTokenizer.from_config(cfg), ACTION_STATS, config=cfg,
                     draft=DraftHead(cfg) if speculative else None)


def tiny_l1_policy(backbone=None, *, seed: int = 0, **sizes: int) -> L1Policy:
    torch.manual_seed(seed)
    backbone = backbone if backbone is not None else TinyBackbone(hidden_dim=32, image_size=IMAGE, width=16)
    cfg = tiny_config(backbone.hidden_dim, **sizes)
    return L1Policy(backbone, L1ActionHead(cfg), ACTION_STATS, config=cfg)

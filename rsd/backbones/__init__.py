"""Backbones: observation + instruction -> hidden [B, D]. Importing this package registers them all."""

from rsd.backbones.base import (
    Backbone,
    backbone_spec,
    build_backbone,
    check_hidden,
    load_backbone,
    register_backbone,
    registered_backbones,
    save_backbone,
)
from rsd.backbones.hf import HFBackbone
from rsd.backbones.tiny import TinyBackbone

__all__ = [
    "Backbone",
    "HFBackbone",
    "TinyBackbone",
    "backbone_spec",
    "build_backbone",
    "check_hidden",
    "load_backbone",
    "register_backbone",
    "registered_backbones",
    "save_backbone",
]

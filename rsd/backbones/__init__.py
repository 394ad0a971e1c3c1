"""Backbones: observation + instruction -> hidden [B, D].

Importing this package registers every backbone (none imports transformers at import time), so
``build_backbone`` / ``load_backbone`` know all names. A new backbone module must be imported here.
"""

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
from rsd.backbones.lowdim import LowDimBackbone
from rsd.backbones.openvla import OpenVLAOFTBackbone
from rsd.backbones.openvla_shaped import OpenVLAShapedBackbone
from rsd.backbones.pixel import PixelBackbone
from rsd.backbones.tiny import TinyBackbone

__all__ = [
    "Backbone",
    "HFBackbone",
    "LowDimBackbone",
    "OpenVLAOFTBackbone",
    "OpenVLAShapedBackbone",
    "PixelBackbone",
    "TinyBackbone",
    "backbone_spec",
    "build_backbone",
    "check_hidden",
    "load_backbone",
    "register_backbone",
    "registered_backbones",
    "save_backbone",
]

"""OpenVLA-OFT's own pipeline behind rsd's Policy protocol: the L1 baseline as OFT runs it.

``OFTL1Policy(backbone)`` with an :class:`~rsd.backbones.openvla.OpenVLAOFTBackbone`: OFT's L1 head on its
action-token hidden states (``backbone.predict_actions``, normalized ``[1, C, A]``), its ``action`` statistics,
OFT's post-processing (un-normalize without clipping, as OFT; gripper binarized and flipped to the env
convention: ``ActionPostprocessor(stats, clip=False)``). The backbone feeds the model OFT's exact pixels
(``rsd.images.oft_model_input``, centre crop included unless the backbone was loaded with ``center_crop=False``).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from rsd.backbones.openvla import OpenVLAOFTBackbone
from rsd.errors import ActionGenerationError, ConfigError
from rsd.policy.postprocess import ActionPostprocessor
from rsd.policy.protocol import ActionChunk

__all__ = ["OFTL1Policy"]


class OFTL1Policy:
    """``predict_chunk(observation, instruction) -> ActionChunk`` with env-ready ``actions [C, A]``."""

    kind = "openvla-oft-l1"

    def __init__(self, backbone: OpenVLAOFTBackbone) -> None:
        if not isinstance(backbone, OpenVLAOFTBackbone):
            raise ConfigError(f"OFTL1Policy needs an OpenVLAOFTBackbone, got {type(backbone).__name__}.")
        self.backbone = backbone
        self.postprocessor = ActionPostprocessor(backbone.action_stats, clip=False)
        self.num_calls = 0

    def reset(self) -> None:
        """Stateless between chunks (the eval loop owns the action queue)."""

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        try:
            t0 = time.perf_counter()
            normalized = self.backbone.predict_actions(dict(observation), instruction)  # [1, C, A]
            if normalized.shape[0] != 1:
                raise ConfigError(f"predict_chunk takes one observation, got a batch of {normalized.shape[0]}.")
            actions = self.postprocessor(normalized[0].cpu().numpy())  # [C, A]
            self.num_calls += 1
            info = {"policy": self.kind, "used_rfsq": False, "unnorm_key": self.backbone.unnorm_key,
                    "center_crop": self.backbone.center_crop,
                    "timing_ms": {"total_ms": 1e3 * (time.perf_counter() - t0)}, "num_calls": self.num_calls}
            return ActionChunk(actions=actions, info=info)
        except Exception as exc:  # every failure surfaces, typed, with its cause; no action is returned
            raise ActionGenerationError(f"OFTL1Policy failed for {instruction!r}: {type(exc).__name__}: {exc}") from exc

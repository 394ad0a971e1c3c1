"""The one action post-processor: normalized model actions -> env-ready actions.

``ActionPostprocessor(stats)(normalized [..., A]) -> float32 [..., A]``: clip to ``[-1, 1]`` (``clip=True``, what
rsd's learned policies and the tokenizer round trip do; OpenVLA-OFT's own pipeline un-normalizes without
clipping: ``clip=False``), un-normalize (``normalization``: BOUNDS_Q99 by default, or BOUNDS) where the
statistics' mask is true, then the gripper from model convention (``[0, 1]``, 1 = open) to env convention (``-1`` open / ``+1`` close, binarized:
``g = -sign(2g - 1)``, ``rsd.normalize.model_to_env_gripper``).
"""

from __future__ import annotations

import numpy as np

from rsd.errors import NonFiniteError, ShapeError
from rsd.normalize import BOUNDS_Q99, BoundsNormalizer, NormStats, model_to_env_gripper

__all__ = ["ActionPostprocessor"]


class ActionPostprocessor:
    """Normalized ``[..., A]`` -> env-ready float32 ``[..., A]`` with the action statistics ``stats``."""

    def __init__(self, stats: NormStats, *, clip: bool = True, normalization: str = BOUNDS_Q99) -> None:
        self.stats = stats
        self.normalizer = BoundsNormalizer(stats, normalization)
        self.clip = bool(clip)

    def __call__(self, normalized: np.ndarray) -> np.ndarray:
        n = np.asarray(normalized)
        if n.ndim < 1 or n.shape[-1] != self.stats.dim:
            raise ShapeError(f"normalized actions must be [..., {self.stats.dim}], got shape {n.shape}.")
        if not np.all(np.isfinite(n)):
            raise NonFiniteError("normalized actions contain NaN/inf before post-processing.")
        actions = self.normalizer.unnormalize(np.clip(n, -1.0, 1.0) if self.clip else n)
        actions[..., -1] = model_to_env_gripper(actions[..., -1])
        return actions.astype(np.float32)

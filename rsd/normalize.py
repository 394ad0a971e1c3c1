"""Action/proprio normalization (BOUNDS_Q99, as OpenVLA-OFT) and gripper conventions.

BOUNDS_Q99 (OpenVLA-OFT's LIBERO normalization), applied only where ``mask`` is true (the gripper is masked out)::

    x_norm = clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    x      = 0.5 (x_norm + 1) (q99 - q01) + q01

Statistics files follow OpenVLA-OFT's ``dataset_statistics.json``::

    {"libero_spatial_no_noops": {"action": {"q01": [...], "q99": [...], "mask": [...], "mean": ..., "std": ...},
                                 "proprio": {...}}, ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rsd.errors import ConfigError, NonFiniteError, ShapeError, UnknownUnnormKeyError

__all__ = [
    "NormStats",
    "BoundsQ99Normalizer",
    "GripperConvention",
    "MODEL_GRIPPER",
    "ENV_GRIPPER",
    "model_to_env_gripper",
    "resolve_unnorm_key",
    "load_dataset_statistics",
]

_EPS = 1e-8


def _vector(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ShapeError(f"`{name}` must be a 1-D vector, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise NonFiniteError(f"`{name}` contains NaN/inf: the statistics file is corrupt.")
    return arr


def _bool_vector(values: Any) -> np.ndarray:
    """``mask`` as a bool vector; only real booleans (JSON true/false) are accepted: ``"false"`` or ``0`` would
    silently become True / False by numpy's casting."""
    arr = np.asarray(values)
    if arr.dtype != np.bool_:
        raise ConfigError(f"`mask` must hold booleans (JSON true / false), got {values!r:.200}: fix the statistics "
                          f"file (e.g. \"mask\": [true, true, true, true, true, true, false]).")
    if arr.ndim != 1:
        raise ShapeError(f"`mask` must be a 1-D vector, got shape {arr.shape}.")
    return arr


@dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one quantity (actions or proprio)."""

    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray  # bool: True where normalization applies
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def __post_init__(self) -> None:
        q01 = _vector(self.q01, "q01")
        q99 = _vector(self.q99, "q99")
        mask = _bool_vector(self.mask) if self.mask is not None else np.ones_like(q01, dtype=bool)
        if not (q01.shape == q99.shape == mask.shape):
            raise ShapeError(f"q01 {q01.shape}, q99 {q99.shape} and mask {mask.shape} must have the same shape.")
        if np.any(q99[mask] < q01[mask]):
            raise ConfigError(f"q99 < q01 in masked dims: q01={q01.tolist()}, q99={q99.tolist()}.")
        object.__setattr__(self, "q01", q01)
        object.__setattr__(self, "q99", q99)
        object.__setattr__(self, "mask", mask)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _vector(value, name))

    @property
    def dim(self) -> int:
        return int(self.q01.shape[0])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NormStats":
        if not isinstance(data, Mapping):
            raise ConfigError(f"normalization stats must be a JSON object with q01, q99 (and mask, mean, std), got "
                              f"a {type(data).__name__}.")
        missing = [k for k in ("q01", "q99") if k not in data]
        if missing:
            raise ConfigError(f"normalization stats lack {missing}; present keys: {sorted(data)}.")
        return cls(q01=data["q01"], q99=data["q99"], mask=data.get("mask", np.ones(len(data["q01"]), bool)),
                   mean=data.get("mean"), std=data.get("std"))

    def to_dict(self) -> dict[str, list]:
        out: dict[str, list] = {"q01": self.q01.tolist(), "q99": self.q99.tolist(), "mask": self.mask.tolist()}
        if self.mean is not None:
            out["mean"] = self.mean.tolist()
        if self.std is not None:
            out["std"] = self.std.tolist()
        return out

    @classmethod
    def from_data(cls, x: np.ndarray, mask: np.ndarray | None = None) -> "NormStats":
        """Statistics of samples ``x [N, dim]`` (1st/99th percentiles, mean, std)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ShapeError(f"`x` must be [N, dim], got {x.shape}.")
        mask = np.ones(x.shape[1], bool) if mask is None else np.asarray(mask, bool)
        return cls(q01=np.quantile(x, 0.01, axis=0), q99=np.quantile(x, 0.99, axis=0), mask=mask,
                   mean=x.mean(0), std=x.std(0))


@dataclass(frozen=True)
class BoundsQ99Normalizer:
    """``normalize`` / ``unnormalize`` with BOUNDS_Q99 on the masked dims; the rest pass through unchanged."""

    stats: NormStats

    def _check(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[-1:] != (self.stats.dim,):
            raise ShapeError(f"`{name}` last axis must be {self.stats.dim}, got shape {x.shape}.")
        if not np.isfinite(x).all():
            raise NonFiniteError(f"`{name}` contains NaN/inf.")
        return x

    def normalize(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x, "x")
        q01, q99, mask = self.stats.q01, self.stats.q99, self.stats.mask
        scaled = np.clip(2.0 * (x - q01) / (q99 - q01 + _EPS) - 1.0, -1.0, 1.0)
        return np.where(mask, scaled, x).astype(np.float32)

    def unnormalize(self, x_norm: np.ndarray) -> np.ndarray:
        x_norm = self._check(x_norm, "x_norm")
        q01, q99, mask = self.stats.q01, self.stats.q99, self.stats.mask
        raw = 0.5 * (x_norm + 1.0) * (q99 - q01) + q01
        return np.where(mask, raw, x_norm).astype(np.float32)


@dataclass(frozen=True)
class GripperConvention:
    """A named gripper convention: which value opens and which closes."""

    name: str
    open_value: float
    close_value: float
    description: str = field(default="", compare=False)


#: What OpenVLA-OFT models emit: gripper in [0, 1], 0 = close, 1 = open.
MODEL_GRIPPER = GripperConvention("model", open_value=1.0, close_value=0.0,
                                  description="model output in [0, 1]: 0 = close, 1 = open")
#: What LIBERO's OSC controller takes: -1 = open, +1 = close.
ENV_GRIPPER = GripperConvention("env", open_value=-1.0, close_value=1.0,
                                description="LIBERO action[6]: -1 = open, +1 = close")


def model_to_env_gripper(g: np.ndarray) -> np.ndarray:
    """Model gripper ([0, 1], 1 = open) -> env gripper (-1 open / +1 close), binarized as OpenVLA-OFT does.

    ``g = sign(2g - 1)`` (binarize around 0.5) then ``g = -g`` (flip). Exactly 0.5 maps to 0 (sign(0)), as in
    OpenVLA-OFT's ``normalize_gripper_action(binarize=True)`` followed by ``invert_gripper_action``.
    """
    g = np.asarray(g, dtype=np.float32)
    if not np.isfinite(g).all():
        raise NonFiniteError("gripper values contain NaN/inf.")
    return (-np.sign(2.0 * g - 1.0)).astype(np.float32)


def resolve_unnorm_key(stats: Mapping[str, Any], suite: str) -> str:
    """``<suite>`` if present, else ``<suite>_no_noops``; otherwise :class:`UnknownUnnormKeyError` listing keys."""
    for key in (suite, f"{suite}_no_noops"):
        if key in stats:
            return key
    raise UnknownUnnormKeyError(
        f"No normalization statistics for suite {suite!r} (tried {suite!r} and {suite + '_no_noops'!r}). "
        f"Keys in the statistics: {sorted(stats)}. Use a checkpoint fine-tuned on {suite!r} or pass the right key."
    )


def load_dataset_statistics(path: str | Path) -> dict[str, dict[str, NormStats]]:
    """Read an OpenVLA-OFT ``dataset_statistics.json`` into ``{key: {"action": NormStats, "proprio": NormStats}}``."""
    from rsd.checkpoint import read_json  # a JSON object, or a typed error naming the file

    path = Path(path)
    raw = read_json(path, what="dataset statistics", hint="OpenVLA-OFT checkpoints ship `dataset_statistics.json` "
                                                          "next to the weights; download the checkpoint again.")
    out: dict[str, dict[str, NormStats]] = {}
    for key, entry in raw.items():
        if not isinstance(entry, Mapping) or "action" not in entry:
            raise ConfigError(f"{path}: entry {key!r} has no 'action' statistics.")
        out[key] = {name: NormStats.from_dict(entry[name]) for name in ("action", "proprio") if name in entry}
    return out

"""Action/proprio normalization (BOUNDS_Q99 as OpenVLA-OFT, or BOUNDS) and gripper conventions.

Both of OpenVLA's bounds normalizations, applied only where ``mask`` is true (the gripper is masked out), with
``(lo, hi) = (q01, q99)`` for ``"bounds_q99"`` (OpenVLA-OFT's LIBERO normalization) or ``(min, max)`` for
``"bounds"``::

    x_norm = clip(2 (x - lo) / (hi - lo + 1e-8) - 1, -1, 1)
    x      = 0.5 (x_norm + 1) (hi - lo) + lo

Why both: BOUNDS_Q99 clips the rarest 1 % of each dim. When a motion only one task needs is rare in the whole
dataset (turning the gripper before reaching into a drawer: 1.1 % of the steps of rsd's libero_spatial +
libero_object demos), its q99 lies far below the values that task commands (0.096 against up to 0.68), and no policy
whose outputs are un-normalized with those statistics can command them: ``rsd train-tokenizer`` reports the clipped
fraction per task and dim (``clipping`` in its report, ``rsd.train.clipping``).
BOUNDS keeps every recorded value reachable (``docs/learned-policies.md``, section 2).

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
    "NORMALIZATIONS",
    "BoundsNormalizer",
    "BoundsQ99Normalizer",
    "GripperConvention",
    "MODEL_GRIPPER",
    "ENV_GRIPPER",
    "model_to_env_gripper",
    "resolve_unnorm_key",
    "load_dataset_statistics",
]

_EPS = 1e-8
BOUNDS_Q99, BOUNDS = "bounds_q99", "bounds"
#: the normalization kinds rsd knows (OpenVLA's NormalizationType names, lower-cased)
NORMALIZATIONS: tuple[str, ...] = (BOUNDS_Q99, BOUNDS)


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
    min: np.ndarray | None = None
    max: np.ndarray | None = None

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
        for name in ("mean", "std", "min", "max"):
            value = getattr(self, name)
            if value is not None:
                value = _vector(value, name)
                if value.shape != q01.shape:
                    raise ShapeError(f"`{name}` has shape {value.shape}, q01 {q01.shape}: the statistics are corrupt.")
                object.__setattr__(self, name, value)
        if (self.min is None) != (self.max is None):
            raise ConfigError("normalization stats have one of min / max but not the other: the file is corrupt.")
        if self.min is not None and np.any(self.max[mask] < self.min[mask]):
            raise ConfigError(f"max < min in masked dims: min={self.min.tolist()}, max={self.max.tolist()}.")

    def bounds(self, normalization: str) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` of a normalization: ``(q01, q99)`` for ``"bounds_q99"``, ``(min, max)`` for ``"bounds"``."""
        if normalization == BOUNDS_Q99:
            return self.q01, self.q99
        if normalization == BOUNDS:
            if self.min is None or self.max is None:
                raise ConfigError("normalization 'bounds' needs the statistics' min and max, and these have none: "
                                  "recompute them (rsd train-tokenizer / rsd collect write both) or use 'bounds_q99'.")
            return self.min, self.max
        raise ConfigError(f"unknown normalization {normalization!r}; known: {list(NORMALIZATIONS)}.")

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
                   mean=data.get("mean"), std=data.get("std"), min=data.get("min"), max=data.get("max"))

    def to_dict(self) -> dict[str, list]:
        out: dict[str, list] = {"q01": self.q01.tolist(), "q99": self.q99.tolist(), "mask": self.mask.tolist()}
        if self.mean is not None:
            out["mean"] = self.mean.tolist()
        if self.std is not None:
            out["std"] = self.std.tolist()
        if self.min is not None and self.max is not None:
            out["min"], out["max"] = self.min.tolist(), self.max.tolist()
        return out

    @classmethod
    def from_data(cls, x: np.ndarray, mask: np.ndarray | None = None) -> "NormStats":
        """Statistics of samples ``x [N, dim]`` (1st/99th percentiles, mean, std, min, max)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ShapeError(f"`x` must be [N, dim], got {x.shape}.")
        mask = np.ones(x.shape[1], bool) if mask is None else np.asarray(mask, bool)
        return cls(q01=np.quantile(x, 0.01, axis=0), q99=np.quantile(x, 0.99, axis=0), mask=mask,
                   mean=x.mean(0), std=x.std(0), min=x.min(0), max=x.max(0))


@dataclass(frozen=True)
class BoundsNormalizer:
    """``normalize`` / ``unnormalize`` with ``normalization`` (``"bounds_q99"``, OpenVLA-OFT's, or ``"bounds"``) on
    the masked dims; the rest pass through unchanged."""

    stats: NormStats
    normalization: str = BOUNDS_Q99

    def __post_init__(self) -> None:
        self.stats.bounds(self.normalization)  # an unknown kind, or bounds without min/max: refused here

    def _check(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[-1:] != (self.stats.dim,):
            raise ShapeError(f"`{name}` last axis must be {self.stats.dim}, got shape {x.shape}.")
        if not np.isfinite(x).all():
            raise NonFiniteError(f"`{name}` contains NaN/inf.")
        return x

    def normalize(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x, "x")
        lo, hi = self.stats.bounds(self.normalization)
        scaled = np.clip(2.0 * (x - lo) / (hi - lo + _EPS) - 1.0, -1.0, 1.0)
        return np.where(self.stats.mask, scaled, x).astype(np.float32)

    def unnormalize(self, x_norm: np.ndarray) -> np.ndarray:
        x_norm = self._check(x_norm, "x_norm")
        lo, hi = self.stats.bounds(self.normalization)
        raw = 0.5 * (x_norm + 1.0) * (hi - lo) + lo
        return np.where(self.stats.mask, raw, x_norm).astype(np.float32)


def BoundsQ99Normalizer(stats: NormStats) -> BoundsNormalizer:  # noqa: N802 (the name OpenVLA users look for)
    """OpenVLA-OFT's BOUNDS_Q99 normalizer: ``BoundsNormalizer(stats, "bounds_q99")``."""
    return BoundsNormalizer(stats, BOUNDS_Q99)


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

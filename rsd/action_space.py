"""The normalized action space a tokenizer is trained in, and its file ``action_stats.json``.

Env actions ``[..., 7]`` (``[dx, dy, dz, droll, dpitch, dyaw, gripper]``, gripper -1 open / +1 close) map to
the normalized space the way OpenVLA-OFT's LIBERO data pipeline and post-processing do:

- gripper -> model convention first (OpenVLA's ``libero_dataset_transform``: ``g = 1 - clip(g, 0, 1)``, so
  env -1 (open) -> 1 and env +1 (close) -> 0); it is masked out, so it stays in ``[0, 1]``;
- the 6 arm dims -> ``normalization`` (``"bounds"``: min/max, or OpenVLA-OFT's ``"bounds_q99"``: q01/q99) with the
  statistics of the recorded demos (``rsd.normalize`` says why rsd's tokenizers use ``"bounds"``).

Back to env actions exactly as the learned policies do it (``rsd.policy.postprocess.ActionPostprocessor``):
clip to ``[-1, 1]``, un-normalize, gripper ``g = -sign(2g - 1)`` (binarized).

``action_stats.json`` (written by ``rsd train-tokenizer`` next to the tokenizer)::

    {"format": "rsd.action_stats", "format_version": 1, "gripper": "model", "normalization": "bounds",
     "action": {"q01": [7], "q99": [7], "min": [7], "max": [7], "mask": [6 x true, false], "mean": [7], "std": [7]},
     "source": {...: which demos, how many steps}}

A file without ``"normalization"`` was written before rsd knew two kinds: it means ``"bounds_q99"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rsd.errors import CheckpointMismatchError, CheckpointNotFoundError, ShapeError
from rsd.normalize import BOUNDS_Q99, NORMALIZATIONS, BoundsNormalizer, NormStats
from rsd.policy.postprocess import ActionPostprocessor

__all__ = ["ACTION_STATS_NAME", "ActionSpace", "env_to_model_gripper"]

ACTION_STATS_NAME = "action_stats.json"
_FORMAT = "rsd.action_stats"
_FORMAT_VERSION = 1
_ACTION_DIM = 7


def env_to_model_gripper(g: np.ndarray) -> np.ndarray:
    """Env gripper (-1 open / +1 close) -> model convention (1 open / 0 close): ``1 - clip(g, 0, 1)``."""
    return (1.0 - np.clip(np.asarray(g, dtype=np.float64), 0.0, 1.0)).astype(np.float32)


def _check_actions(actions: Any, name: str) -> np.ndarray:
    a = np.asarray(actions)
    if a.ndim < 1 or a.shape[-1] != _ACTION_DIM:
        raise ShapeError(f"`{name}` must be [..., {_ACTION_DIM}] actions, got shape {a.shape}.")
    return a


class ActionSpace:
    """Statistics of env actions, their normalization kind and the gripper convention: ``normalize`` / ``to_env``."""

    def __init__(self, stats: NormStats, source: Mapping[str, Any] | None = None, *,
                 normalization: str = BOUNDS_Q99) -> None:
        if stats.dim != _ACTION_DIM:
            raise ShapeError(f"action statistics must have {_ACTION_DIM} dims, got {stats.dim}.")
        if bool(stats.mask[-1]):
            raise CheckpointMismatchError("action statistics must leave the gripper (last dim) unnormalized "
                                          "(mask[-1] false), as OpenVLA-OFT does.")
        self.stats = stats
        self.normalizer = BoundsNormalizer(stats, normalization)  # refuses an unknown kind
        self.postprocessor = ActionPostprocessor(stats, clip=True, normalization=normalization)  # what policies run
        self.source = dict(source or {})

    @classmethod
    def fit(cls, env_actions: np.ndarray, source: Mapping[str, Any] | None = None, *,
            normalization: str = BOUNDS_Q99) -> "ActionSpace":
        """Statistics of env actions ``[N, 7]`` (gripper converted to model convention first)."""
        a = _check_actions(env_actions, "env_actions")
        if a.ndim != 2:
            raise ShapeError(f"`env_actions` must be [N, {_ACTION_DIM}], got {a.shape}.")
        model = np.array(a, dtype=np.float64, copy=True)
        model[:, -1] = env_to_model_gripper(model[:, -1])
        mask = np.array([True] * (_ACTION_DIM - 1) + [False])
        return cls(NormStats.from_data(model, mask=mask), source, normalization=normalization)

    @property
    def normalization(self) -> str:
        """``"bounds"`` or ``"bounds_q99"`` (``rsd.normalize``)."""
        return self.normalizer.normalization

    def normalize(self, env_actions: np.ndarray) -> np.ndarray:
        """Env actions ``[..., 7]`` -> normalized float32 ``[..., 7]`` (arm in [-1, 1], gripper in [0, 1])."""
        a = np.array(_check_actions(env_actions, "env_actions"), dtype=np.float64, copy=True)
        a[..., -1] = env_to_model_gripper(a[..., -1])
        return self.normalizer.normalize(a)

    def clipped(self, env_actions: np.ndarray) -> np.ndarray:
        """Which values of env actions ``[..., 7]`` lie outside the normalization's bounds (bool ``[..., 7]``,
        the gripper never): a policy un-normalizing with these statistics can never command them."""
        a = np.asarray(_check_actions(env_actions, "env_actions"), dtype=np.float64)
        lo, hi = self.stats.bounds(self.normalization)
        outside = (a < lo - 1e-9) | (a > hi + 1e-9)  # [..., 7]
        return outside & self.stats.mask

    def to_env(self, normalized: np.ndarray) -> np.ndarray:
        """Normalized ``[..., 7]`` -> env-ready float32 ``[..., 7]``: clip, un-normalize, binarize the gripper."""
        return self.postprocessor(_check_actions(normalized, "normalized"))

    # -- file

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / ACTION_STATS_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "gripper": "model",
                "normalization": self.normalization, "action": self.stats.to_dict(), "source": self.source}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ActionSpace":
        path = Path(directory) / ACTION_STATS_NAME
        if not path.is_file():
            raise CheckpointNotFoundError(f"{path} does not exist: `rsd train-tokenizer` writes it next to the "
                                          f"tokenizer (BOUNDS_Q99 statistics of the demos it was trained on).")
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT or data.get("format_version") != _FORMAT_VERSION:
            raise CheckpointMismatchError(f"{path} is not an {_FORMAT} v{_FORMAT_VERSION} file "
                                          f"(found {data.get('format')!r} v{data.get('format_version')!r}).")
        if data.get("gripper") != "model":
            raise CheckpointMismatchError(f"{path}: gripper convention {data.get('gripper')!r}, expected 'model'.")
        normalization = data.get("normalization", BOUNDS_Q99)  # files from before the key existed: BOUNDS_Q99
        if normalization not in NORMALIZATIONS:
            raise CheckpointMismatchError(f"{path}: normalization {normalization!r} is not one of "
                                          f"{list(NORMALIZATIONS)}; the file is corrupt or from a newer rsd.")
        return cls(NormStats.from_dict(data["action"]), data.get("source"), normalization=normalization)

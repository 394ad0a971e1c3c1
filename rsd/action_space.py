"""The normalized action space a tokenizer is trained in, and its file ``action_stats.json``.

Env actions ``[..., 7]`` (``[dx, dy, dz, droll, dpitch, dyaw, gripper]``, gripper -1 open / +1 close) map to
the normalized space the way OpenVLA-OFT's LIBERO data pipeline and post-processing do:

- gripper -> model convention first (OpenVLA's ``libero_dataset_transform``: ``g = 1 - clip(g, 0, 1)``, so
  env -1 (open) -> 1 and env +1 (close) -> 0); it is masked out of BOUNDS_Q99, so it stays in ``[0, 1]``;
- the 6 arm dims -> BOUNDS_Q99 with the statistics of the recorded demos (``rsd.normalize``).

Back to env actions exactly as the learned policies do it (``rsd.policy.postprocess.ActionPostprocessor``):
clip to ``[-1, 1]``, un-normalize, gripper ``g = -sign(2g - 1)`` (binarized).

``action_stats.json`` (written by ``rsd train-tokenizer`` next to the tokenizer)::

    {"format": "rsd.action_stats", "format_version": 1, "gripper": "model",
     "action": {"q01": [7], "q99": [7], "mask": [6 x true, false], "mean": [7], "std": [7]},
     "source": {...: which demos, how many steps}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rsd.errors import CheckpointMismatchError, CheckpointNotFoundError, ShapeError
from rsd.normalize import BoundsQ99Normalizer, NormStats
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
    """BOUNDS_Q99 statistics of env actions + the gripper convention: ``normalize`` / ``to_env``."""

    def __init__(self, stats: NormStats, source: Mapping[str, Any] | None = None) -> None:
        if stats.dim != _ACTION_DIM:
            raise ShapeError(f"action statistics must have {_ACTION_DIM} dims, got {stats.dim}.")
        if bool(stats.mask[-1]):
            raise CheckpointMismatchError("action statistics must leave the gripper (last dim) unnormalized "
                                          "(mask[-1] false), as OpenVLA-OFT does.")
        self.stats = stats
        self.normalizer = BoundsQ99Normalizer(stats)
        self.postprocessor = ActionPostprocessor(stats, clip=True)  # what rsd's learned policies execute
        self.source = dict(source or {})

    @classmethod
    def fit(cls, env_actions: np.ndarray, source: Mapping[str, Any] | None = None) -> "ActionSpace":
        """Statistics of env actions ``[N, 7]`` (gripper converted to model convention first)."""
        a = _check_actions(env_actions, "env_actions")
        if a.ndim != 2:
            raise ShapeError(f"`env_actions` must be [N, {_ACTION_DIM}], got {a.shape}.")
        model = np.array(a, dtype=np.float64, copy=True)
        model[:, -1] = env_to_model_gripper(model[:, -1])
        mask = np.array([True] * (_ACTION_DIM - 1) + [False])
        return cls(NormStats.from_data(model, mask=mask), source)

    def normalize(self, env_actions: np.ndarray) -> np.ndarray:
        """Env actions ``[..., 7]`` -> normalized float32 ``[..., 7]`` (arm in [-1, 1], gripper in [0, 1])."""
        a = np.array(_check_actions(env_actions, "env_actions"), dtype=np.float64, copy=True)
        a[..., -1] = env_to_model_gripper(a[..., -1])
        return self.normalizer.normalize(a)

    def to_env(self, normalized: np.ndarray) -> np.ndarray:
        """Normalized ``[..., 7]`` -> env-ready float32 ``[..., 7]``: clip, un-normalize, binarize the gripper."""
        return self.postprocessor(_check_actions(normalized, "normalized"))

    # -- file

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / ACTION_STATS_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "gripper": "model",
                "action": self.stats.to_dict(), "source": self.source}
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
        return cls(NormStats.from_dict(data["action"]), data.get("source"))

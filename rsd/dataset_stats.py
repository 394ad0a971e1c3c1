"""Normalization statistics of recorded demonstrations, in OpenVLA's ``dataset_statistics.json`` shape.

``rsd collect`` writes them next to its HDF5 file; ``rsd.normalize.load_dataset_statistics`` reads them, the same
reader the OpenVLA-OFT checkpoints' files go through, so one un-normalization path serves both::

    {"<suite>_no_noops": {"action":  {"mean", "std", "max", "min", "q01", "q99": [7], "mask": [6 x true, false]},
                          "proprio": {"mean", "std", "max", "min", "q01", "q99": [8], "mask": [8 x true]},
                          "num_transitions": n, "num_trajectories": m}}

As OpenVLA's LIBERO data: actions carry the gripper in model convention (``1 - clip(g, 0, 1)``: 1 open, 0 close;
``rsd.action_space.env_to_model_gripper``), and the gripper is masked out of BOUNDS_Q99 (mask false, its
statistics are still given); proprio is OpenVLA-OFT's 8-d state, ``ee_pos 3 + ee_ori 3 (axis-angle) +
gripper_states 2`` (``rsd.sim.protocol.proprio_from_obs`` per step), every dim normalized. Quantiles are numpy's
linear ones, ``std`` the population standard deviation, as OpenVLA computes them. Transitions whose action is a
no-op (arm action norm below ``NOOP_NORM`` and the gripper unchanged from the step before: the test by which
OpenVLA's ``*_no_noops`` LIBERO datasets were filtered) are left out of the statistics, and counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from rsd.action_space import env_to_model_gripper
from rsd.errors import ConfigError, NonFiniteError, ShapeError

__all__ = ["NOOP_NORM", "PROPRIO_KEYS", "statistics_key", "statistics_path", "noop_mask", "demo_proprio",
           "quantity_statistics", "dataset_statistics", "write_dataset_statistics"]

NOOP_NORM = 1e-4  # an action whose 6 arm dims have a smaller norm, with the gripper unchanged, is a no-op
PROPRIO_KEYS: tuple[tuple[str, int], ...] = (("ee_pos", 3), ("ee_ori", 3), ("gripper_states", 2))  # -> [T, 8]
_ACTION_DIM = 7


def statistics_key(suite: str) -> str:
    """The key OpenVLA-OFT's LIBERO checkpoints use for a suite's statistics (``resolve_unnorm_key`` finds it)."""
    return f"{suite}_no_noops"


def statistics_path(demo_file: str | Path) -> Path:
    """Where ``rsd collect`` writes the statistics of ``demo_file``: ``<stem>_dataset_statistics.json`` beside it."""
    demo_file = Path(demo_file)
    return demo_file.with_name(f"{demo_file.stem}_dataset_statistics.json")


def noop_mask(actions: np.ndarray) -> np.ndarray:
    """bool ``[T]``: which env actions ``[T, 7]`` of one episode are no-ops (the first step never is)."""
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != _ACTION_DIM:
        raise ShapeError(f"actions must be [T, {_ACTION_DIM}], got {a.shape}.")
    still = np.linalg.norm(a[:, :-1], axis=1) < NOOP_NORM  # [T]
    same_gripper = np.concatenate([[False], a[1:, -1] == a[:-1, -1]])  # [T]
    return still & same_gripper


def demo_proprio(obs: Mapping[str, np.ndarray], name: str = "demo") -> np.ndarray:
    """OpenVLA-OFT's proprio ``[T, 8]`` of one demo from its ``obs`` datasets (``PROPRIO_KEYS``)."""
    parts = []
    for key, width in PROPRIO_KEYS:
        if key not in obs:
            raise ConfigError(f"{name} has no obs/{key}, which proprio statistics need (present: {sorted(obs)}); "
                              f"record the demos with `rsd collect`.")
        value = np.asarray(obs[key], dtype=np.float64)
        if value.ndim != 2 or value.shape[1] != width:
            raise ShapeError(f"{name}: obs/{key} must be [T, {width}], got {value.shape}.")
        parts.append(value)
    return np.concatenate(parts, axis=1)  # [T, 3 + 3 + 2]


def quantity_statistics(x: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """``{"mean", "std", "max", "min", "q01", "q99", "mask"}`` of samples ``x [N, D]`` (lists, JSON-ready)."""
    x = np.asarray(x, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if x.ndim != 2 or x.shape[0] == 0 or mask.shape != (x.shape[1],):
        raise ShapeError(f"statistics need samples [N >= 1, D] and a mask [D], got {x.shape} and {mask.shape}.")
    if not np.isfinite(x).all():
        raise NonFiniteError("the samples contain NaN/inf: the demo file is corrupt.")
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(),
            "min": x.min(0).tolist(), "q01": np.quantile(x, 0.01, axis=0).tolist(),
            "q99": np.quantile(x, 0.99, axis=0).tolist(), "mask": mask.tolist()}


def dataset_statistics(demos: Iterable[Any], suite: str) -> dict[str, dict[str, Any]]:
    """Statistics of ``demos`` (``rsd.sim.demos.Demo``) under ``statistics_key(suite)`` (the module docstring)."""
    actions, proprio = [], []
    trajectories = noops = 0
    for demo in demos:
        keep = ~noop_mask(demo.actions)  # [T]
        model = np.array(demo.actions, dtype=np.float64)  # [T, 7] env convention
        model[:, -1] = env_to_model_gripper(model[:, -1])
        actions.append(model[keep])
        proprio.append(demo_proprio(demo.obs, demo.name)[keep])
        trajectories += 1
        noops += int((~keep).sum())
    if not trajectories:
        raise ConfigError("no demo to compute statistics from.")
    a = np.concatenate(actions)  # [N, 7]
    p = np.concatenate(proprio)  # [N, 8]
    return {statistics_key(suite): {
        "action": quantity_statistics(a, np.array([True] * (_ACTION_DIM - 1) + [False])),
        "proprio": quantity_statistics(p, np.ones(p.shape[1], dtype=bool)),
        "num_transitions": int(a.shape[0]),
        "num_trajectories": trajectories,
        "num_noops_skipped": noops,
    }}


def write_dataset_statistics(demo_file: str | Path, suite: str, out: str | Path | None = None) -> Path:
    """Compute the statistics of every demo in ``demo_file`` and write them (atomically) to ``out``
    (default ``statistics_path(demo_file)``); returns the path."""
    from rsd.sim.demos import read_demos

    out = statistics_path(demo_file) if out is None else Path(out)
    stats = dataset_statistics(read_demos(demo_file), suite)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(partial, out)
    return out

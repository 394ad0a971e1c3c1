"""Which recorded actions an action space cannot represent: per task and arm dim, the share of a demo set's actions
outside the normalization's bounds (``rsd.action_space.ActionSpace.clipped``).

A policy whose outputs are un-normalized with those statistics can never command a clipped value. A few clipped
outliers cost nothing; a motion only one task makes can be most of that task's values in its dim (OpenVLA-OFT's
q01/q99 bounds clipped 18.7 % of the yaw commands of libero_spatial's drawer task, to a tenth of their size, and no
policy solved it). ``rsd train-tokenizer`` and ``rsd train-policy`` print :func:`clipping_warnings` and keep
:func:`clipping_by_task` in their reports.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["CLIP_WARN", "DIM_NAMES", "clipping_by_task", "clipping_warnings"]

CLIP_WARN = 0.05  # a task whose actions are clipped in some dim more often than this is warned about
DIM_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")


def clipping_by_task(demos: Sequence[Any], space: Any) -> dict[str, dict[str, Any]]:
    """Per task (instruction): steps, and per arm dim the fraction of its actions outside the action space's
    normalization bounds, with the largest such value. The gripper is never normalized, so never clipped."""
    by_task: dict[str, list[np.ndarray]] = {}
    for demo in demos:
        by_task.setdefault(demo.instruction, []).append(np.asarray(demo.actions))
    out: dict[str, dict[str, Any]] = {}
    for instruction, actions in by_task.items():
        a = np.concatenate(actions)  # [T, 7] env units
        outside = space.clipped(a)  # [T, 7]
        fraction = outside.mean(axis=0)
        extreme = [float(np.abs(a[outside[:, d], d]).max()) if outside[:, d].any() else None for d in range(a.shape[1])]
        out[instruction] = {"steps": int(a.shape[0]),
                            "clipped_fraction": {DIM_NAMES[d]: float(fraction[d]) for d in range(a.shape[1] - 1)},
                            "largest_clipped": {DIM_NAMES[d]: extreme[d] for d in range(a.shape[1] - 1)}}
    return out


def clipping_warnings(clipping: dict[str, dict[str, Any]], space: Any, limit: float = CLIP_WARN, *,
                      fix: str = "Use --normalization bounds.") -> list[str]:
    """One ``WARNING: ...`` line per (task, dim) of :func:`clipping_by_task` whose clipped share exceeds ``limit``,
    with the bounds, the largest clipped value and ``fix`` (what to do about it)."""
    lo, hi = space.stats.bounds(space.normalization)
    lines = []
    for instruction, entry in clipping.items():
        for d, (dim, frac) in enumerate(entry["clipped_fraction"].items()):
            if frac > limit:
                lines.append(f"WARNING: {space.normalization} clips {100 * frac:.1f} % of the {dim} actions of "
                             f"{instruction!r} (bounds [{lo[d]:.4g}, {hi[d]:.4g}], its largest "
                             f"{entry['largest_clipped'][dim]:.4g}): no policy using these statistics can command "
                             f"them. {fix}")
    return lines

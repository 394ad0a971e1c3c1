"""The one interface between policies and the simulator: ``Policy`` and the ``ActionChunk`` it returns.

numpy only (no torch): the simulator, the evaluation loop and the scripted experts import this module and
nothing else of ``rsd.policy``, so they never pull in model code.

    policy.reset()                                          # start of an episode
    chunk = policy.predict_chunk(observation, instruction)  # observation: rsd.observation's contract
    chunk.actions  float32 [C, A], env-ready (un-normalized; gripper -1 open / +1 close), finite
    chunk.info     plain data (JSON-serialisable): timings in ms, diagnostics

The evaluation loop owns the open-loop action queue; policies return whole chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from rsd.errors import DTypeError, NonFiniteError, ShapeError

__all__ = ["ActionChunk", "Policy"]


@dataclass(frozen=True)
class ActionChunk:
    """``actions``: float32 ``[C, A]``, env-ready (un-normalized; gripper -1 open / +1 close). ``info``: plain data."""

    actions: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        actions = self.actions
        if not isinstance(actions, np.ndarray):
            raise DTypeError(f"ActionChunk.actions must be a numpy array, got {type(actions).__name__}.")
        if actions.ndim != 2:
            raise ShapeError(f"ActionChunk.actions must be [C, A], got shape {actions.shape}.")
        if actions.dtype != np.float32:
            raise DTypeError(f"ActionChunk.actions must be float32, got {actions.dtype}.")
        if not np.isfinite(actions).all():
            raise NonFiniteError("ActionChunk.actions contain NaN/inf.")


@runtime_checkable
class Policy(Protocol):
    """The one interface between policies and the simulator."""

    def reset(self) -> None:
        """Called at the start of every episode."""

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        """Return the next open-loop chunk of env-ready actions."""

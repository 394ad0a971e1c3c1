"""One episode of the OpenVLA-OFT LIBERO protocol: the loop that ``rsd eval`` and ``rsd collect`` both run.

``seed_everything(seed)``, ``policy.reset()``, ``env.reset(init_state_index)``; 10 settle steps with the dummy
action; then the policy is queried only when the open-loop action queue is empty, and success is the ``done`` flag
that ``env.step`` returns (``info['success']`` is never read). The loop knows an env through :class:`EpisodeEnv`
(``rsd.sim.libero.LiberoEnv``) and a policy through its protocol (``reset``, ``predict_chunk`` -> ``ActionChunk``).
"""

from __future__ import annotations

import random
import time
import traceback as _traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from rsd.errors import ShapeError
from rsd.sim import protocol

__all__ = ["seed_everything", "EpisodeOutcome", "EpisodeEnv", "settle", "run_episode"]


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (all devices) and make cuDNN deterministic, as OFT does."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class EpisodeOutcome:
    """What :func:`run_episode` returns. ``exception`` is the live object (not serialized) for re-raising."""

    success: bool
    steps: int
    chunk_latencies_ms: tuple[float, ...]
    error: str | None = None
    traceback: str | None = None
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @classmethod
    def failed(cls, exc: Exception, steps: int = 0, chunk_latencies_ms: tuple[float, ...] = ()) -> EpisodeOutcome:
        """The outcome of an episode that raised ``exc``; call it in the ``except`` block (it formats the traceback
        being handled)."""
        return cls(success=False, steps=steps, chunk_latencies_ms=chunk_latencies_ms,
                   error=f"{type(exc).__name__}: {exc}", traceback=_traceback.format_exc(), exception=exc)


class EpisodeEnv(Protocol):
    """What the loop needs from an env (``rsd.sim.libero.LiberoEnv``)."""

    def reset(self, init_state_index: int) -> dict[str, Any]: ...
    def step(self, action: np.ndarray, *, images: bool = True) -> tuple[dict[str, Any], bool]: ...
    def frame(self) -> np.ndarray: ...


def _check_chunk(chunk: Any) -> np.ndarray:
    from rsd.policy.protocol import ActionChunk  # the protocol record; its constructor checks dtype/finiteness

    if not isinstance(chunk, ActionChunk):
        raise ShapeError(f"predict_chunk must return an rsd.policy.ActionChunk, got {type(chunk).__name__}.")
    actions = chunk.actions
    if actions.ndim != 2 or actions.shape[0] < 1 or actions.shape[1] != protocol.ACTION_DIM:
        raise ShapeError(f"ActionChunk.actions must be [C >= 1, {protocol.ACTION_DIM}], got {actions.shape}.")
    return actions


def settle(env: Any) -> dict[str, Any]:
    """The protocol's settle steps after a reset: ``NUM_STEPS_WAIT`` dummy actions (their ``done`` ignored, no
    frames kept), the policy images made for the last one only; its observation, the first a policy reads."""
    obs: dict[str, Any] = {}
    for i in range(protocol.NUM_STEPS_WAIT):
        obs, _done = env.step(protocol.dummy_action(), images=i == protocol.NUM_STEPS_WAIT - 1)
    return obs


def run_episode(env: EpisodeEnv, policy: Any, instruction: str, init_state_index: int, max_steps: int, *,
                seed: int = protocol.SEED, on_frame: Callable[[np.ndarray], None] | None = None,
                on_step: Callable[[dict[str, Any], np.ndarray], None] | None = None) -> EpisodeOutcome:
    """One protocol episode. Never raises for episode failures: they come back as ``error`` / ``exception``.

    ``seed_everything(seed)``, ``policy.reset()``, ``obs = env.reset(init_state_index)``; 10 settle steps with
    the dummy action (their ``done`` is ignored, no frames); then up to ``max_steps`` policy actions from an
    open-loop queue refilled by ``policy.predict_chunk(obs, instruction)`` only when empty; success = ``done``
    from ``env.step``. ``on_frame(env.frame())`` is called before every policy action and once at the end
    (so a video has ``steps + 1`` frames); ``on_step(obs, action)`` right before each policy action.

    Steps whose observation no policy reads (the settle steps but the last, the steps inside a chunk) run with
    ``env.step(..., images=False)``: rendered all the same, but the policy images' preprocessing (JPEG round trip,
    two Lanczos resizes: about 18 ms a step on one CPU core) is skipped, so their ``obs`` passed to ``on_step``
    lacks ``full_image`` / ``wrist_image`` (``raw`` keeps the camera frames).
    """
    steps = 0
    latencies: list[float] = []
    try:
        seed_everything(seed)
        policy.reset()
        env.reset(init_state_index)
        obs = settle(env)
        queue: deque[np.ndarray] = deque()
        success = False
        while steps < max_steps:
            if not queue:
                t0 = time.perf_counter()
                chunk = policy.predict_chunk(obs, instruction)
                latencies.append(1e3 * (time.perf_counter() - t0))
                queue.extend(_check_chunk(chunk))
            action = queue.popleft()
            if on_frame is not None:
                on_frame(env.frame())
            if on_step is not None:
                on_step(obs, action)
            obs, done = env.step(action, images=not queue)  # read by the policy only when the queue is empty
            steps += 1
            if done:
                success = True
                break
        if on_frame is not None:
            on_frame(env.frame())
        return EpisodeOutcome(success=success, steps=steps, chunk_latencies_ms=tuple(latencies))
    except Exception as exc:  # recorded with its type, message and traceback; the caller stops the eval
        return EpisodeOutcome.failed(exc, steps, tuple(latencies))



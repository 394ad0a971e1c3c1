"""``rsd eval --backend ray --policy-server``: one policy actor serves every env actor's chunks in batches.

The Ray counterpart of ``--backend batched`` (``rsd.eval.batched``, one host), across a cluster:

- **The policy server** (:class:`_PolicyServer`, one async Ray actor; a whole GPU when the policy runs on CUDA) makes
  the policy once, refused unless it can serve several episodes at once (``rsd.eval.batched.check_batchable``).
  Requests wait until every slot in the middle of an episode has asked, or ``window_ms`` has passed since the
  first one; then one ``predict_chunks`` answers them all. A slot is in an episode from its ``reset`` (the episode
  loop's first call) until the driver :meth:`~_PolicyServer.release` s it with the episode's result.
- **Env actors** are ``rsd.eval.ray_backend``'s (one env, one CPU, no GPU) with a :class:`ServedPolicy` as their
  policy: its ``predict_chunk`` is a call to the server, whose error (a row's ``BatchActionError`` result, or the
  whole batch's) it raises as the policy would have, with its ``__cause__`` (what ``rsd.eval.decoding`` reads).
  They import no model code.
- Not here: ``--batch-pad`` (one host only), and more than one server (every chunk of the run comes from one GPU).
"""

from __future__ import annotations

import asyncio
import time
import traceback as _traceback
from typing import Any, Callable

from rsd.eval.batched import (DEFAULT_WINDOW_MS, batch_stats, check_batchable, chunk_of, predict_rows, server_reply,
                              without_raw)
from rsd.eval.runners import _picklable

__all__ = ["ServedPolicy", "policy_server", "server_options"]


class _PolicyServer:
    """The body of the policy server actor (made remote by :func:`policy_server`); every method runs on its event
    loop, so no two batches overlap."""

    def __init__(self, policy_factory: Callable[[], Any], window_ms: float = DEFAULT_WINDOW_MS) -> None:
        self.fatal: tuple[BaseException, str] | None = None
        try:
            self.policy = policy_factory()
            check_batchable(self.policy)
        except BaseException as exc:  # set-up failed: the driver re-raises it (ready())
            self.fatal = (_picklable(exc), _traceback.format_exc())
        self.window_s = window_ms / 1e3
        self.active: set[int] = set()  # slots in the middle of an episode
        self.pending: dict[int, tuple[Any, str, asyncio.Future]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.latency_ms: dict[int, list[float]] = {}  # batch size -> predict_chunks time of each batch

    async def ready(self) -> tuple[str, Any]:
        return ("fatal", self.fatal) if self.fatal is not None else ("ready", type(self.policy).__name__)

    async def reset(self, slot: int) -> None:
        self.policy.reset_slot(slot)
        self.active.add(slot)

    async def release(self, slot: int) -> None:
        """``slot``'s episode ended (the driver has its result): the batches no longer wait for it."""
        self.active.discard(slot)
        self._serve_if_due()

    async def predict(self, slot: int, observation: Any, instruction: str) -> tuple[Any, ...]:
        future = asyncio.get_running_loop().create_future()
        self.active.add(slot)  # also when the driver's release of its last episode arrived after this one's reset
        self.pending[slot] = (observation, instruction, future)
        if not self._serve_if_due() and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.window_s, self._serve)
        return await future

    def _serve_if_due(self) -> bool:
        if self.pending and self.active <= set(self.pending):
            self._serve()
            return True
        return False

    def _serve(self) -> None:
        """One ``predict_chunks`` for every pending request; each gets its chunk or its error."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, {}
        if not batch:
            return
        slots = list(batch)
        t0 = time.perf_counter()
        replies = predict_rows(self.policy, [batch[s][0] for s in slots], [batch[s][1] for s in slots], slots)
        self.latency_ms.setdefault(len(slots), []).append(1e3 * (time.perf_counter() - t0))
        for slot, reply in zip(slots, replies):
            future = batch[slot][2]
            if not future.done():
                future.set_result(server_reply(reply))

    async def stats(self) -> dict[str, Any]:
        """The batches served so far (``rsd.eval.batched.BatchedRunner.server_stats``'s keys)."""
        return {"window_ms": self.window_s * 1e3, "padded_to": None, **batch_stats(self.latency_ms)}


def policy_server(ray: Any) -> Any:
    return ray.remote(_PolicyServer)


def server_options(num_gpus: float) -> dict[str, Any]:
    """The server's resources: one CPU and ``num_gpus`` (one whole GPU for a CUDA policy: ``RayRunner`` decides);
    concurrent calls, so that requests wait together for a batch."""
    return {"num_cpus": 1, "num_gpus": num_gpus, "max_restarts": 0, "max_concurrency": 1000}


class ServedPolicy:
    """An env actor's policy: every call goes to the policy server (``server``, an actor handle) under ``slot``."""

    def __init__(self, server: Any, slot: int) -> None:
        import ray

        self.server, self.slot, self._get = server, slot, ray.get

    def reset(self) -> None:
        self._get(self.server.reset.remote(self.slot))

    def predict_chunk(self, observation: Any, instruction: str) -> Any:
        reply = self._get(self.server.predict.remote(self.slot, without_raw(observation), instruction))
        return chunk_of(reply, "rsd eval --backend ray --policy-server")


class ServedPolicyFactory:
    """Picklable: makes an env actor's :class:`ServedPolicy` (``RayRunner`` gives each actor its own slot)."""

    def __init__(self, server: Any, slot: int) -> None:
        self.server, self.slot = server, slot

    def __call__(self) -> ServedPolicy:
        return ServedPolicy(self.server, self.slot)

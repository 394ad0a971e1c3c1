"""``rsd eval --backend batched``: K env worker processes step LIBERO; this process holds the one policy and answers
their requests in batches (docs/batched-eval.md).

- **Env workers** (``spawn``-started, :func:`_worker_main`): each an :class:`~rsd.eval.runners.EpisodeWorker` (one
  env per task, ``rsd.sim.episode.run_episode`` unchanged, its mp4 and decoding tally) whose policy is a
  :class:`PolicyClient`: ``predict_chunk`` sends ``(slot, observation, instruction)`` to this process and waits for
  the chunk, or for the policy's error, which it raises as the policy would have; ``reset`` sends a reset of its
  slot. A worker is one slot (a replacement gets a new one). Workers import no model code and never touch CUDA;
  they set LIBERO up as :class:`~rsd.eval.runners.ParallelRunner`'s do (the inherited environment, ``rsd.sim.libero``
  on first use). The simulator's ``raw`` observation stays in the worker: learned policies never read it.
- **Policy server** (:class:`BatchedRunner`, this process): makes the policy (``policy_factory``: on CUDA when
  that is its device), refused unless it has ``predict_chunks`` and ``reset_slot`` (the learned policies,
  ``rsd.policy.batching``), never run one episode at a time instead. It collects requests until every worker in
  the middle of an episode has asked or ``window_ms`` has passed since the first one, runs one ``predict_chunks``
  and answers each worker. :meth:`BatchedRunner.server_stats` gives the batch sizes reached and the latency per
  batch size (``summary.json``'s ``batched`` block, printed at the end of ``rsd eval``).
- **Padding** (``pad``, ``rsd eval --batch-pad``): every ``predict_chunks`` gets one row per started worker, each
  worker at its own fixed row, the rows of workers not asking filled with copies of a request under slots of their
  own (negative, their history reset before each batch), whose chunks are dropped. A batched kernel's float result
  depends on the batch's shape (on an H200 an action differed by up to 1e-6 between a row alone and the same row in
  a batch; ``scripts/batch_consistency.py``), and the simulator turns such differences into different episodes;
  with one shape for every batch a row's chunk no longer depends on which other workers asked. An image backbone
  stacks all rows into one forward; a low-dimensional one stacks them per task, so its shapes still vary.
- **Failures**: a row's policy error (``BatchActionError``) reaches that row's episode only, an error of the whole
  batch reaches each of its episodes; the episode records it as with any backend. A worker that dies while running
  an episode is replaced by a fresh one and the episode runs again, counted once; after :attr:`BatchedRunner.retries`
  re-runs it is recorded as errored (``WorkerDied: ...``) and the run stops as after any errored episode (as
  ``rsd.eval.ray_backend`` does). A worker that dies before asking for its first episode is a ConfigError.
"""

from __future__ import annotations

import os
import signal
import time
import traceback as _traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from rsd.errors import BatchActionError, ConfigError
from rsd.eval.records import EpisodeKey, EpisodeResult
from rsd.eval.runners import EpisodeWorker, WorkerSettings, _picklable, rerun_or_give_up
from rsd.observation import RAW
from rsd.stats import percentiles

__all__ = ["DEFAULT_WINDOW_MS", "BatchedRunner", "PolicyClient", "check_batchable", "format_server_stats",
           "server_reply", "chunk_of", "without_raw", "batch_stats", "predict_rows"]

DEFAULT_WINDOW_MS = 5.0  # how long the server waits for the other workers' requests after the first one
_IDLE_WAIT_S = 0.5  # the loop's wait when no request is pending: stays responsive to Ctrl-C


def check_batchable(policy: Any) -> None:
    """ConfigError naming the policy unless it serves several episodes at once (``predict_chunks`` and
    ``reset_slot``): the batched backend never runs a policy one episode at a time instead."""
    missing = [name for name in ("predict_chunks", "reset_slot") if not callable(getattr(policy, name, None))]
    if missing:
        raise ConfigError(f"--backend batched runs one policy for every episode, several episodes in one forward "
                          f"pass (predict_chunks); {type(policy).__name__} has no {' / '.join(missing)}. Run it with "
                          f"--backend local (--workers K: a copy of the policy per worker). The learned policies "
                          f"(lowdim, lowdim-l1, a directory saved by RSDPolicy / L1Policy) can be batched.")


class PolicyClient:
    """The policy as an env worker's episode loop sees it: each call is a request to the policy server, over
    ``conn`` (the worker's end of its pipe). ``slot`` names the worker's episodes to the server."""

    def __init__(self, slot: int, conn: Any) -> None:
        self.slot, self._conn = slot, conn

    def reset(self) -> None:
        self._conn.send(("reset", self.slot))

    def predict_chunk(self, observation: Any, instruction: str) -> Any:
        self._conn.send(("predict", self.slot, without_raw(observation), instruction))
        return chunk_of(self._conn.recv(), "rsd eval --backend batched")


def predict_rows(policy: Any, observations: Sequence[Any], instructions: Sequence[str], slots: Sequence[int]
                 ) -> list[Any]:
    """One ``predict_chunks`` of a policy server; per row its chunk or its error: the row's own when only some rows
    failed (``BatchActionError``), the batch's for every row when the whole call failed."""
    try:
        return list(policy.predict_chunks(observations, instructions, slots))
    except BatchActionError as exc:
        return list(exc.results)
    except Exception as exc:
        return [exc] * len(slots)


def batch_stats(latency_ms: dict[int, list[float]]) -> dict[str, Any]:
    """A policy server's batches from ``latency_ms`` (batch size -> each batch's ``predict_chunks`` time): their
    number, the chunks served, the mean batch size, batches per size, and p50 / p90 latency per size."""
    batches = sum(len(v) for v in latency_ms.values())
    chunks = sum(size * len(v) for size, v in latency_ms.items())
    sizes = sorted(latency_ms)
    return {"batches": batches, "chunks": chunks, "mean_batch_size": chunks / batches if batches else None,
            "batch_sizes": {str(s): len(latency_ms[s]) for s in sizes},
            "latency_ms": {str(s): percentiles(latency_ms[s]) for s in sizes}}


def without_raw(observation: Any) -> dict[str, Any]:
    """What a policy server gets of an observation: the simulator's ``raw`` state stays with the env."""
    return {k: v for k, v in observation.items() if k != RAW}


def server_reply(value: Any) -> tuple[Any, ...]:
    """A policy server's answer to one request: ``("chunk", chunk)``, or for an error ``("error", exc, cause,
    traceback)`` (its ``__cause__`` sent beside it: pickling drops it)."""
    if isinstance(value, BaseException):
        return ("error", _picklable(value), _cause(value), "".join(_traceback.format_exception(value)))
    return ("chunk", value)


def chunk_of(reply: tuple[Any, ...], server: str) -> Any:
    """The chunk of a :func:`server_reply`, or its error raised as the policy would have, with its ``__cause__``
    (what ``rsd.eval.decoding`` reads: the greedy check of a refused chunk) and a note naming the ``server``."""
    if reply[0] == "chunk":
        return reply[1]
    _, exc, cause, server_traceback = reply
    if cause is not None:
        exc.__cause__ = cause
    exc.add_note(f"(raised in the policy server of {server})\n{server_traceback}")
    raise exc


def _worker_main(slot: int, settings: WorkerSettings, worker_factory: Callable[[WorkerSettings, Any], Any],
                 conn: Any) -> None:
    """A spawned env worker: ask the server for episodes until it says stop (or is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server handles Ctrl-C and stops the workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # no model runs here: the cores are the server's and the envs'
    try:
        worker = worker_factory(settings, PolicyClient(slot, conn))
    except BaseException as exc:  # set-up failed: the server re-raises it
        conn.send(("fatal", _picklable(exc), _traceback.format_exc()))
        return
    try:
        while True:
            conn.send(("ready",))
            message = conn.recv()
            if message[0] != "episode":
                break
            conn.send(("result", worker.run(message[1])))
    except (EOFError, OSError):  # the server is gone: don't linger as an orphan
        pass
    finally:
        worker.close()


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Any
    ready: bool = False  # it asked for an episode: its set-up worked
    stopped: bool = False  # it was told to stop: its exit is no death
    row: int = 0  # its row of a padded batch (pad): the row of the worker it replaced, if any
    key: EpisodeKey | None = None  # the episode it runs
    request: tuple[Any, str, float] | None = None  # (observation, instruction, arrival) waiting for a chunk


@dataclass
class _Run:
    pending: deque[EpisodeKey]
    workers: dict[int, _Worker] = field(default_factory=dict)
    deaths: dict[EpisodeKey, int] = field(default_factory=dict)
    done: list[EpisodeResult] = field(default_factory=list)  # results not yet yielded
    next_slot: int = 0
    stopping: bool = False
    announced: bool = False  # on_ready was called


class BatchedRunner:
    """``workers`` env worker processes and one policy in this process, served in batches (module docstring).

    ``window_ms``: how long a batch waits for the workers still stepping their env after the first request.
    ``retries``: how often an episode runs again after its worker died under it. ``worker_factory`` makes what
    runs the episodes in a worker (``EpisodeWorker``; tests put a worker on a fake env there; it must pickle).
    """

    def __init__(self, settings: WorkerSettings, policy_factory: Callable[[], Any], workers: int, *,
                 window_ms: float = DEFAULT_WINDOW_MS, pad: bool = False) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}.")
        if not window_ms > 0:
            raise ConfigError(f"--batch-window-ms must be > 0, got {window_ms}.")
        self.settings, self.policy_factory, self.workers, self.window_ms = settings, policy_factory, workers, window_ms
        self.pad = bool(pad)  # every batch as _rows rows (module docstring)
        self._rows = workers  # the workers a run starts: min(workers, episodes)
        self.on_ready: Callable[[], None] | None = None  # called when the policy is made and a worker is ready
        self.retries = 2
        self.worker_factory: Callable[[WorkerSettings, Any], Any] = EpisodeWorker
        self.restarts = 0  # workers started to replace dead ones (this runner's last run)
        self._latency_ms: dict[int, list[float]] = {}  # batch size -> each batch's predict_chunks time
        self._ctx: Any = None  # the spawn context of a run

    # ------------------------------------------------------------------ what the server reached

    def server_stats(self) -> dict[str, Any]:
        """The last run's batches: their number, the chunks served, the mean batch size, how many batches of each
        size (``batch_sizes``) and ``predict_chunks``'s latency per batch size (``latency_ms``: p50 / p90)."""
        return {"workers": self.workers, "window_ms": self.window_ms, "padded_to": self._rows if self.pad else None,
                **batch_stats(self._latency_ms), "worker_restarts": self.restarts}

    # ------------------------------------------------------------------ the run

    def results(self, keys: Sequence[EpisodeKey]) -> Iterator[EpisodeResult]:
        if not keys:
            return
        policy = self.policy_factory()
        check_batchable(policy)
        import multiprocessing as mp

        self._ctx = mp.get_context("spawn")
        self._latency_ms, self.restarts = {}, 0
        run = _Run(pending=deque(keys))
        self._rows = min(self.workers, len(keys))
        try:
            for _ in range(self._rows):
                self._start(run)
            while run.workers:
                self._receive(run, policy)
                yield from run.done
                run.done.clear()
                if self._batch_due(run):
                    self._serve(run, policy)
            yield from run.done
        finally:
            self._shut_down(run)

    def _start(self, run: _Run) -> None:
        parent, child = self._ctx.Pipe()
        slot, run.next_slot = run.next_slot, run.next_slot + 1
        process = self._ctx.Process(target=_worker_main, name=f"rsd-eval-env-{slot}", daemon=True,
                                    args=(slot, self.settings, self.worker_factory, child))
        process.start()
        child.close()  # the worker holds its end: its exit closes the pipe
        row = min(set(range(self._rows)) - {w.row for w in run.workers.values()})
        run.workers[slot] = _Worker(slot, process, parent, row=row)

    def _receive(self, run: _Run, policy: Any) -> None:
        """Wait for messages (until the batch window closes, when requests are pending) and handle them all."""
        from multiprocessing.connection import wait

        pending = [w.request[2] for w in run.workers.values() if w.request is not None]
        timeout = _IDLE_WAIT_S if not pending else max(0.0, min(pending) + self.window_ms / 1e3 - time.monotonic())
        owners = {w.conn: w for w in run.workers.values()} | {w.process.sentinel: w for w in run.workers.values()}
        for ready in wait(list(owners), timeout):
            worker = owners[ready]
            if worker.slot not in run.workers:  # already handled in this round (its pipe and its exit)
                continue
            try:
                while worker.conn.poll():
                    self._handle(worker, worker.conn.recv(), run, policy)
                if ready is worker.process.sentinel:  # exited, and its last messages are read
                    raise EOFError
            except (EOFError, OSError):
                self._gone(worker, run, policy)

    def _handle(self, worker: _Worker, message: tuple[Any, ...], run: _Run, policy: Any) -> None:
        kind = message[0]
        if kind == "predict":
            worker.request = (message[2], message[3], time.monotonic())
        elif kind == "reset":
            policy.reset_slot(worker.slot)
        elif kind == "ready":
            worker.ready, worker.key = True, None
            if not run.announced and self.on_ready is not None:
                self.on_ready()
            run.announced = True
            if run.stopping or not run.pending:
                worker.stopped = True
                worker.conn.send(("stop",))
            else:
                worker.key = run.pending.popleft()
                worker.conn.send(("episode", worker.key))
        elif kind == "result":
            result, worker.key = message[1], None  # recorded: a death from here on re-runs nothing
            run.stopping |= result.error is not None
            run.done.append(result)
        elif kind == "fatal":
            exc, tb = message[1], message[2]
            exc.add_note(f"(in eval env worker {worker.slot})\n{tb}")
            raise exc

    def _batch_due(self, run: _Run) -> bool:
        """A batch is due when every worker in the middle of an episode has asked, or the window has closed."""
        asking = [w.request[2] for w in run.workers.values() if w.request is not None]
        if not asking:
            return False
        busy = [w for w in run.workers.values() if w.key is not None]
        return (all(w.request is not None for w in busy)
                or time.monotonic() >= min(asking) + self.window_ms / 1e3)

    def _serve(self, run: _Run, policy: Any) -> None:
        """One ``predict_chunks`` for every pending request; each worker gets its chunk or its error."""
        batch = [w for w in run.workers.values() if w.request is not None]
        requests = [w.request for w in batch]
        for w in batch:
            w.request = None
        observations, instructions = [r[0] for r in requests], [r[1] for r in requests]
        slots, rows = [w.slot for w in batch], list(range(len(batch)))
        t0 = time.perf_counter()
        if self.pad:
            observations, instructions, slots, rows = self._padded(batch, observations, instructions, policy)
        replies = predict_rows(policy, observations, instructions, slots)
        replies = [replies[r] for r in rows]
        self._latency_ms.setdefault(len(batch), []).append(1e3 * (time.perf_counter() - t0))
        for worker, reply in zip(batch, replies):
            try:
                worker.conn.send(server_reply(reply))
            except OSError:  # it died while the batch ran: the next wait finds its exit
                pass

    def _padded(self, batch: list[_Worker], observations: list[Any], instructions: list[str], policy: Any
                ) -> tuple[list[Any], list[str], list[int], list[int]]:
        """The batch as ``_rows`` rows: each worker's request at its row, the other rows copies of the first request
        under slot ``-1 - row`` (reset first: no history carries over); and where each worker's reply will be."""
        width = self._rows
        obs, ins, slots = [observations[0]] * width, [instructions[0]] * width, [-1 - r for r in range(width)]
        for i, worker in enumerate(batch):
            obs[worker.row], ins[worker.row], slots[worker.row] = observations[i], instructions[i], worker.slot
        for slot in slots:
            if slot < 0:
                policy.reset_slot(slot)
        return obs, ins, slots, [w.row for w in batch]

    def _gone(self, worker: _Worker, run: _Run, policy: Any) -> None:
        """``worker`` has exited: stopped as asked, or died (its episode re-run on a fresh worker, or recorded)."""
        del run.workers[worker.slot]
        worker.conn.close()
        worker.process.join(timeout=5.0)
        policy.reset_slot(worker.slot)  # its episode's history goes with it
        if worker.stopped:
            return
        who, code = f"env worker {worker.slot} (pid {worker.process.pid})", worker.process.exitcode
        if not worker.ready:
            raise ConfigError(f"WorkerDied: {who} exited with code {code} before it ran an episode (see its output "
                              f"above).")
        if worker.key is not None:
            result = rerun_or_give_up(worker.key, run.deaths, run.pending, retries=self.retries,
                                      seed=self.settings.seed, who=who, replacement="worker", what="its env worker",
                                      cause=f"exit code {code}")
            if result is not None:
                run.stopping = True
                run.done.append(result)
        if not run.stopping and run.pending:  # a fresh worker takes its place
            self.restarts += 1
            self._start(run)

    def _shut_down(self, run: _Run) -> None:
        """Workers still running (an error, Ctrl-C): closing their pipes ends them (the server is gone for them: the
        episode in progress ends with an error nobody records); the stragglers are terminated after 30 s."""
        for worker in run.workers.values():
            worker.conn.close()
        deadline = time.monotonic() + 30.0
        for worker in run.workers.values():
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5.0)


def _cause(exc: BaseException) -> BaseException | None:
    """The error's ``__cause__``, which pickling drops: sent beside it."""
    return None if exc.__cause__ is None else _picklable(exc.__cause__)


def format_server_stats(stats: dict[str, Any]) -> str:
    """The lines ``rsd eval`` prints about the policy server (:meth:`BatchedRunner.server_stats`)."""
    if not stats["batches"]:
        return "policy server: no chunk served"
    latency = ", ".join(f"{size}: {lat['p50']:.1f} / {lat['p90']:.1f} ms"
                        for size, lat in stats["latency_ms"].items())
    sizes = ", ".join(f"{size}: {n}" for size, n in stats["batch_sizes"].items())
    return (f"policy server: {stats['chunks']} chunks in {stats['batches']} batches from "
            f"{stats['workers']} env workers (mean batch {stats['mean_batch_size']:.2f}; window "
            f"{stats['window_ms']:g} ms; {stats['worker_restarts']} workers replaced)\n"
            f"  batches per size: {sizes}\n  predict_chunks p50 / p90 per batch size: {latency}")

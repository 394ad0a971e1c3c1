"""Who runs the episodes of ``rsd eval``: in this process (:class:`SerialRunner`) or in ``spawn``-started worker
processes (:class:`ParallelRunner`), each episode by an :class:`EpisodeWorker` (one policy, one env per task, the
protocol loop ``rsd.sim.episode.run_episode``, an mp4 per episode through :class:`VideoSink`).

A runner yields :class:`~rsd.eval.records.EpisodeResult` s; only the parent process writes files. After an errored
result it dispatches no new episode, yields the ones still in flight, and ends.
"""

from __future__ import annotations

import contextlib
import os
import queue as _queue
import signal
import sys
import time
import traceback as _traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from rsd.errors import ConfigError
from rsd.eval.decoding import RecordingPolicy
from rsd.eval.records import EpisodeKey, EpisodeResult
from rsd.sim import protocol
from rsd.sim.episode import EpisodeOutcome, run_episode
from rsd.stats import percentiles

__all__ = ["VIDEO_DIR", "VIDEO_MODES", "WorkerSettings", "VideoSink", "EpisodeWorker", "Runner", "SerialRunner",
           "ParallelRunner", "worker_threads", "worker_died_result", "rerun_or_give_up", "gl_renderer"]

VIDEO_DIR = "videos"
VIDEO_MODES = ("all", "failures", "none")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs (picklable)."""

    suite: str
    render: bool
    camera_size: int
    seed: int
    video: str
    out: Path


class VideoSink:
    """Streams frames to ``<final>.partial.mp4``; ``finish(keep)`` renames it into place or deletes it."""

    def __init__(self, final: Path) -> None:
        import imageio.v2 as imageio

        self.final = final
        self.partial = final.with_name(final.stem + ".partial.mp4")
        final.parent.mkdir(parents=True, exist_ok=True)
        self._writer = imageio.get_writer(self.partial, fps=protocol.VIDEO_FPS, codec="libx264", quality=7,
                                          macro_block_size=1)
        self.frames = 0

    def __call__(self, frame: np.ndarray) -> None:
        self._writer.append_data(frame)
        self.frames += 1

    def finish(self, keep: bool) -> bool:
        self._writer.close()
        if keep and self.frames > 0:
            os.replace(self.partial, self.final)
            return True
        self.partial.unlink(missing_ok=True)
        return False


class EpisodeWorker:
    """Runs episodes in this process: one policy, envs made lazily per task.

    Episodes arrive task-major (all trials of a task, then the next task), so the env of a task is closed
    when the worker moves on to another task: it would never be used again.
    """

    def __init__(self, settings: WorkerSettings, policy: Any) -> None:
        self.settings = settings
        self.policy = policy
        self._env: Any = None
        self._env_task: int | None = None
        self._renderer: str | None = None  # this process's GL "vendor / renderer", read after its first rendered one

    def _get_env(self, task_id: int) -> Any:
        if self._env_task != task_id:
            self.close()
            from rsd.sim.libero import make_env

            self._env = make_env(self.settings.suite, task_id, render=self.settings.render,
                                 camera_size=self.settings.camera_size, seed=protocol.ENV_SEED)
            self._env_task = task_id
        return self._env

    def run(self, key: EpisodeKey) -> EpisodeResult:
        s = self.settings
        t0 = time.perf_counter()
        name, instruction = "", ""
        sink: VideoSink | None = None
        policy = RecordingPolicy(self.policy)  # tallies how an RSD policy decoded (rsd.eval.decoding)
        try:
            env = self._get_env(key.task_id)
            name, instruction = env.task.name, env.task.instruction
            if s.video != "none":
                sink = VideoSink(s.out / VIDEO_DIR / f"{key.suite}_task{key.task_id:02d}_trial{key.trial:02d}.mp4")
            outcome = run_episode(env, policy, instruction, key.init_state_index, protocol.max_steps_for(s.suite),
                                  seed=s.seed, on_frame=sink)
        except Exception as exc:  # env creation / video set-up: an episode error like any other
            outcome = EpisodeOutcome.failed(exc)
        if s.render and self._renderer is None and self._env is not None:
            self._renderer = gl_renderer()
        video = None
        if sink is not None:
            keep = s.video == "all" or not outcome.success
            if sink.finish(keep):
                video = str(sink.final.relative_to(s.out))
        lat = percentiles(outcome.chunk_latencies_ms)
        return EpisodeResult(
            suite=key.suite, task_id=key.task_id, task_name=name, instruction=instruction, trial=key.trial,
            init_state_index=key.init_state_index, success=outcome.success, steps=outcome.steps,
            error=outcome.error, latency_p50_ms=lat["p50"], latency_p90_ms=lat["p90"],
            chunk_latencies_ms=outcome.chunk_latencies_ms, wall_s=time.perf_counter() - t0, video=video,
            seed=s.seed, traceback=outcome.traceback, speculative=policy.tally(), renderer=self._renderer)

    def close(self) -> None:
        if self._env is not None:
            env, self._env, self._env_task = self._env, None, None
            env.close()


def gl_renderer() -> str:
    """``"vendor / renderer"`` of the GL context current in this process (a rendered env's, after its first frame);
    ``"unknown (...)"`` when it cannot be read (the episodes ran; only this description of them is missing)."""
    from rsd.sim.setup import current_gl

    try:
        gl = current_gl()
    except Exception as exc:  # allowed: metadata only; the record says it is unknown and why
        return f"unknown ({type(exc).__name__}: {exc})"
    return f"{gl['vendor']} / {gl['renderer']}"


def worker_died_result(key: EpisodeKey, seed: int, error: str) -> EpisodeResult:
    """The errored result of an episode whose worker died while running it: ``error`` (``"WorkerDied: ..."``) gains
    `` while running task T trial I``."""
    return EpisodeResult(suite=key.suite, task_id=key.task_id, task_name="", instruction="", trial=key.trial,
                         init_state_index=key.init_state_index, success=False, steps=0,
                         error=f"{error} while running task {key.task_id} trial {key.trial}", latency_p50_ms=None,
                         latency_p90_ms=None, chunk_latencies_ms=(), wall_s=0.0, video=None, seed=seed)


def rerun_or_give_up(key: EpisodeKey, deaths: dict[EpisodeKey, int], pending: deque[EpisodeKey], *, retries: int,
                     seed: int, who: str, replacement: str, what: str, cause: str) -> EpisodeResult | None:
    """``who`` (a worker) died while running ``key`` of ``cause``: the episode goes back to the front of ``pending``
    (a fresh ``replacement`` runs it again, counted once) until it has died ``retries + 1`` times, then its errored
    result (``WorkerDied: {what} died N times (last: cause)``; the caller stops the run). Says which on stderr."""
    n = deaths[key] = deaths.get(key, 0) + 1
    print(f"rsd eval: {who} died while running task {key.task_id} trial {key.trial} ({cause}); "
          + (f"re-running it on a fresh {replacement}" if n <= retries else f"giving up after {n} deaths"),
          file=sys.stderr)
    if n <= retries:
        pending.appendleft(key)
        return None
    return worker_died_result(key, seed, f"WorkerDied: {what} died {n} times (last: {cause})")


class Runner(Protocol):
    """Yields results of ``keys`` (in any order). After yielding an errored result it dispatches no new
    episode, yields the ones still in flight, and ends."""

    def results(self, keys: Sequence[EpisodeKey]) -> Iterator[EpisodeResult]: ...


class SerialRunner:
    def __init__(self, settings: WorkerSettings, policy_factory: Callable[[], Any]) -> None:
        self.worker = EpisodeWorker(settings, policy_factory())

    def results(self, keys: Sequence[EpisodeKey]) -> Iterator[EpisodeResult]:
        try:
            for key in keys:
                result = self.worker.run(key)
                yield result
                if result.error is not None:
                    return
        finally:
            self.worker.close()


def worker_threads(workers: int) -> int:
    """Torch threads per worker process: ``OMP_NUM_THREADS`` when the user set it (several evals sharing one host
    set it to 1), else this host's cores shared among ``workers``. Without the first rule, 4 evals of 6 workers on a
    32-core host ran 4 x 6 x 5 = 120 threads: 11-15 s per episode, against 6-9 s with one thread per worker in the
    scaling runs on the same host (2 x H200 machine, docs/distributed-eval.md)."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given:
        try:
            value = int(given)
        except ValueError:
            raise ConfigError(f"OMP_NUM_THREADS={given!r} is not an integer: unset it or set a thread count.") from None
        if value < 1:
            raise ConfigError(f"OMP_NUM_THREADS={given!r} must be >= 1: unset it or set a thread count.")
        return value
    return max(1, (os.cpu_count() or 1) // workers)


def _worker_main(wid: int, settings: WorkerSettings, policy_factory: Callable[[], Any], threads: int,
                 jobs: Any, out: Any, parent_pid: int) -> None:
    """A spawned worker: make the policy, then ask the parent for episodes until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the workers
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
        worker = EpisodeWorker(settings, policy_factory())
    except BaseException as exc:  # set-up failed: the parent re-raises it
        out.put(("fatal", wid, _picklable(exc), _traceback.format_exc()))
        return
    try:
        while True:
            out.put(("ready", wid))
            while True:
                try:
                    key = jobs.get(timeout=1.0)
                    break
                except _queue.Empty:
                    if os.getppid() != parent_pid:  # the parent was killed: don't linger as an orphan
                        return
            if key is None:
                break
            out.put(("result", wid, worker.run(key)))
    finally:
        worker.close()
        out.put(("exit", wid))


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # an exception type that does not pickle: keep its type name and message
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class ParallelRunner:
    """K ``spawn``-started worker processes, each with its own policy and envs; the parent hands out episodes
    one at a time (task-major order) and receives results; only the parent writes files."""

    def __init__(self, settings: WorkerSettings, policy_factory: Callable[[], Any], workers: int) -> None:
        self.settings, self.policy_factory, self.workers = settings, policy_factory, workers
        self.on_ready: Callable[[], None] | None = None  # called when the first worker has made its policy

    def results(self, keys: Sequence[EpisodeKey]) -> Iterator[EpisodeResult]:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        n = min(self.workers, len(keys))
        if n == 0:
            return
        threads = worker_threads(n)
        out = ctx.Queue()
        jobs = [ctx.Queue() for _ in range(n)]
        procs = [ctx.Process(target=_worker_main, name=f"rsd-eval-{i}", daemon=True,
                             args=(i, self.settings, self.policy_factory, threads, jobs[i], out, os.getpid()))
                 for i in range(n)]
        for p in procs:
            p.start()
        pending = deque(keys)
        inflight: dict[int, EpisodeKey] = {}
        finished: set[int] = set()
        seen_dead: set[int] = set()
        stopping = False
        try:
            while len(finished) < n:
                try:
                    msg = out.get(timeout=0.5)
                except _queue.Empty:
                    for wid, p in enumerate(procs):
                        if wid in finished or p.is_alive():
                            continue
                        if wid not in seen_dead:  # its last messages may still be in the pipe: poll once more
                            seen_dead.add(wid)
                            continue
                        finished.add(wid)
                        stopping = True
                        key = inflight.pop(wid, None)
                        err = f"WorkerDied: worker process {wid} exited with code {p.exitcode}"
                        if key is None:
                            raise ConfigError(err + " before it ran an episode (see its output above).")
                        yield worker_died_result(key, self.settings.seed, err)
                    continue
                kind, wid = msg[0], msg[1]
                if kind == "ready":
                    if self.on_ready is not None:
                        self.on_ready()
                    if stopping or not pending:
                        jobs[wid].put(None)
                    else:
                        inflight[wid] = pending.popleft()
                        jobs[wid].put(inflight[wid])
                elif kind == "result":
                    inflight.pop(wid, None)
                    result = msg[2]
                    if result.error is not None:
                        stopping = True
                    yield result
                elif kind == "exit":
                    finished.add(wid)
                elif kind == "fatal":
                    exc, tb = msg[2], msg[3]
                    exc.add_note(f"(in eval worker {wid})\n{tb}")
                    raise exc
        finally:
            for q in jobs:
                with contextlib.suppress(Exception):
                    q.put(None)
            deadline = time.monotonic() + 30.0
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5.0)
            for q in (*jobs, out):
                q.cancel_join_thread()
                q.close()

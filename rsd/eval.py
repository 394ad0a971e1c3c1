"""Evaluate a policy on LIBERO with the OpenVLA-OFT protocol; results survive kills and resume exactly.

Protocol (docs reference.md §2; ``rsd.sim.protocol``): one env per task (``env.seed(0)``); trial i starts from
the task's init state i; 10 settle steps with the dummy action (no frames kept); then up to the suite's max
steps, the policy queried only when the open-loop action queue is empty; success is the ``done`` flag that
``env.step`` returns (``info['success']`` is never read). Before every episode ``random``, ``numpy`` and
``torch`` are seeded with ``--seed`` (7), so an episode's outcome does not depend on which episodes ran
before it or in which worker process (OpenVLA-OFT seeds once per run; per-episode seeding is what makes
``--workers`` and ``--resume`` reproduce a serial, uninterrupted run).

Files in ``--out DIR`` (a new or empty directory, or one holding rsd eval's ``run.json``: any other existing
directory, whose ``summary.json`` etc. would be overwritten, is refused; so is an empty ``--out``):
- ``episodes.jsonl``: one JSON line per finished episode, appended by the parent process only, each as a
  single ``write`` of the whole line + flush + fsync, under an exclusive lock on ``DIR/.lock`` (``rsd.filelock``:
  a second eval of the same DIR is refused, naming the holder). A killed eval loses at most the episodes in
  flight; ``--resume`` skips every (task, trial) already recorded.
- ``run.json``: what the episodes depend on (suite, seed, render, camera size, protocol, ``fast``, the device,
  and what stands behind ``--policy``: its kind, statistics key and a content hash of its files,
  ``rsd.policy.factory.policy_identity``; the ``--policy`` text itself is kept for reading only, so the same
  policy named by a relative or an absolute path resumes). ``--resume`` refuses a difference with
  :class:`ResumeMismatchError` naming it (a ``run.json`` written before ``--fast`` existed reads as
  ``fast: false``; one without the policy hash or device cannot be resumed). It is written once the start
  succeeded (the policy loaded in this process, or the first worker is ready) and before the first episode is
  recorded, so a failed start leaves none; a ``run.json`` with no episode recorded binds nothing.
- ``summary.json`` / ``summary.png``: per-task and overall success with Wilson 95 % intervals, mean steps,
  policy latency per chunk (p50/p90), versions, renderer, seed, date, command; the same table is printed.
- ``videos/``: one mp4 per episode (rotated 256 px agentview, 30 fps), all or failures only.

An exception anywhere in an episode (policy or env) records that episode with its error, stops the eval,
writes the summary and exits 1: nothing fails silently. ``--resume`` re-runs errored episodes; the summary
counts each (task, trial) once, from its last record.

``--fast`` runs a learned policy on rsd's CUDA fast path (``rsd.policy.factory``): a backbone with one
(OpenVLA-OFT) compiled and replayed through CUDA graphs, a greedy RSD policy's heads + argmax + detokenize
as one compiled CUDA graph; a speculative RSD policy keeps its speculative decoder (only its backbone gets
faster). Actions match the eager policy's within each part's tolerance (bf16 rounding, argmax ties), the
latencies do not, so ``fast`` is recorded in ``run.json`` and ``summary.json`` and ``--resume`` needs the same
value. A scripted policy, a non-CUDA device or a policy with nothing on a fast path is a ConfigError.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import os
import queue as _queue
import random
import shlex
import signal
import sys
import time
import traceback as _traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from rsd import limits
from rsd.errors import ConfigError, ShapeError
from rsd.filelock import exclusive_lock
from rsd.limits import check_seed
from rsd.rundir import (LOCK_NAME, PLOT_NAME, RESULTS_NAME, RUN_NAME, SUMMARY_NAME, RunRecordWriter, check_out_dir,
                        check_run_record, is_run_dir)
from rsd.rundir import write_json_atomic as _write_json_atomic
from rsd.sim import protocol
from rsd.stats import percentiles, rate_estimate

__all__ = [
    "HELP", "add_arguments", "run",
    "EvalConfig", "EpisodeKey", "EpisodeResult", "EpisodeOutcome", "ResultsFile",
    "evaluate", "run_episode", "seed_everything", "summarize", "format_table", "parse_task_ids", "check_seed",
    "is_run_dir",
]

HELP = "evaluate a policy on LIBERO with the OpenVLA-OFT protocol"

VIDEO_DIR = "videos"
VIDEO_MODES = ("all", "failures", "none")


# ---------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class EvalConfig:
    """One ``rsd eval`` invocation. ``tasks=None`` means every task of the suite (resolved by ``run``)."""

    suite: str
    policy: str
    out: Path
    trials: int = protocol.NUM_TRIALS_PER_TASK
    tasks: tuple[int, ...] | None = None
    workers: int = 1
    video: str = "none"
    render: bool = True
    resume: bool = False
    seed: int = protocol.SEED
    camera_size: int = protocol.CAMERA_SIZE
    max_episodes: int | None = None
    command: str = ""
    progress: bool = True
    device: str | None = None  # learned policies: default cuda when available
    plot: bool = True  # summary.png (matplotlib)
    fast: bool = False  # learned policies on the CUDA fast path (rsd.policy.factory); recorded in run.json
    trust_remote_code: bool = False  # --trust-remote-code: a saved policy's backbone may run its checkpoint's code

    def __post_init__(self) -> None:
        protocol.max_steps_for(self.suite)  # unknown suite -> ConfigError listing the suites
        if not str(self.out).strip():
            raise ConfigError("--out is empty: pass the results directory (a new or empty one, or the directory of "
                              "an earlier rsd eval with --resume).")
        object.__setattr__(self, "out", Path(self.out))
        limits.check_seed(self.seed)
        if self.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {self.trials}.")
        limits.check_workers(self.workers)
        if self.video not in VIDEO_MODES:
            raise ConfigError(f"--video must be one of {VIDEO_MODES}, got {self.video!r}.")
        if self.video != "none" and not self.render:
            raise ConfigError(f"--video {self.video} needs rendered frames: drop --no-render or pass --video none.")
        if self.camera_size < 1:
            raise ConfigError(f"--camera-size must be positive, got {self.camera_size}.")
        if self.max_episodes is not None and self.max_episodes < 1:
            raise ConfigError(f"--max-episodes must be >= 1, got {self.max_episodes}.")
        if self.tasks is not None:
            if not self.tasks:
                raise ConfigError("--tasks selects no task.")
            object.__setattr__(self, "tasks", tuple(int(t) for t in self.tasks))
        if self.fast:  # before anything is written: a scripted policy or an explicit non-CUDA --device
            from rsd.policy.factory import check_fast

            check_fast(self.policy, self.device)
        if self.device is not None:  # a CUDA device on a machine without one: refused before anything is written
            from rsd.policy.factory import check_device

            check_device(self.device)

    @property
    def max_steps(self) -> int:
        return protocol.max_steps_for(self.suite)

    @functools.cached_property
    def policy_identity(self) -> dict[str, Any]:
        """What stands behind ``policy`` (``rsd.policy.factory.policy_identity``: kind, statistics key, content
        hash of its files), computed once: hashing a checkpoint reads all of it."""
        from rsd.policy.factory import policy_identity

        return policy_identity(self.policy)

    def run_record(self) -> dict[str, Any]:
        """What every recorded episode depends on (written to ``run.json``). ``policy`` is the ``--policy`` text
        as given (for reading); ``--resume`` compares the ``policy_*`` keys, which do not depend on how a path
        was written."""
        from rsd.policy.factory import policy_device

        identity = self.policy_identity
        return {"suite": self.suite, "policy": self.policy, "policy_kind": identity["kind"],
                "policy_unnorm_key": identity["unnorm_key"], "policy_content": identity["content"],
                "device": policy_device(self.policy, self.device), "seed": self.seed, "render": self.render,
                "camera_size": self.camera_size, "max_steps": self.max_steps,
                "num_steps_wait": protocol.NUM_STEPS_WAIT, "fast": self.fast}



@dataclass(frozen=True, order=True)
class EpisodeKey:
    """One episode of the protocol: trial ``trial`` of task ``task_id`` starts from init state ``trial``."""

    suite: str
    task_id: int
    trial: int

    @property
    def init_state_index(self) -> int:
        return self.trial


@dataclass(frozen=True)
class EpisodeResult:
    """One line of ``episodes.jsonl``. ``steps`` counts policy actions executed (settle steps excluded)."""

    suite: str
    task_id: int
    task_name: str
    instruction: str
    trial: int
    init_state_index: int
    success: bool
    steps: int
    error: str | None  # None, or "Type: message"
    latency_p50_ms: float | None  # policy latency per chunk (predict_chunk wall clock)
    latency_p90_ms: float | None
    chunk_latencies_ms: tuple[float, ...]
    wall_s: float
    video: str | None  # relative to the eval dir
    seed: int
    traceback: str | None = None

    @property
    def key(self) -> EpisodeKey:
        return EpisodeKey(self.suite, self.task_id, self.trial)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["chunk_latencies_ms"] = [round(x, 4) for x in self.chunk_latencies_ms]
        return json.dumps(data, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EpisodeResult":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"episode record lacks {missing}.")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["chunk_latencies_ms"] = tuple(float(x) for x in kwargs["chunk_latencies_ms"])
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------- results file


class ResultsFile:
    """``DIR/episodes.jsonl``: append-only, one complete JSON line per episode, crash-safe.

    Each append is one ``os.write`` of the whole line on an ``O_APPEND`` descriptor followed by ``fsync``, so
    a kill leaves either the full line or (at worst, for a write cut mid-way) a last line without its
    newline, which :meth:`load` drops (``repair=True`` also truncates it away before appending resumes).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists_nonempty(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def load(self, *, repair: bool = False) -> list[EpisodeResult]:
        """All records in file order. A torn last line (no trailing newline) is ignored (and cut if ``repair``)."""
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        complete_len = raw.rfind(b"\n") + 1
        torn = raw[complete_len:]
        if torn.strip():
            print(f"rsd eval: ignoring a torn last line in {self.path} ({len(torn)} bytes: an episode whose "
                  f"write was cut by a kill; it will be re-run)", file=sys.stderr)
            if repair:
                with open(self.path, "r+b") as f:
                    f.truncate(complete_len)
                    f.flush()
                    os.fsync(f.fileno())
        records = []
        for lineno, raw_line in enumerate(raw[:complete_len].split(b"\n")[:-1], start=1):
            if not raw_line.strip():
                continue
            try:
                records.append(EpisodeResult.from_dict(json.loads(raw_line.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError, ConfigError, TypeError) as exc:
                raise ConfigError(f"{self.path}:{lineno} is not a valid episode record ({exc}); the file was edited "
                                  f"or written by another program. Fix or remove that line, or use another --out."
                                  ) from exc
        return records

    def append(self, result: EpisodeResult) -> None:
        line = (result.to_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # regular files on local disks write everything at once
                raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)


def latest_by_key(records: Sequence[EpisodeResult]) -> dict[EpisodeKey, EpisodeResult]:
    """The last record of every (suite, task, trial): an errored episode re-run by --resume is counted once."""
    out: dict[EpisodeKey, EpisodeResult] = {}
    for r in records:
        out[r.key] = r
    return out


# ---------------------------------------------------------------------------------------------------- one episode


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


class EpisodeEnv(Protocol):
    """What the loop needs from an env (``rsd.sim.libero.LiberoEnv``)."""

    def reset(self, init_state_index: int) -> dict[str, Any]: ...
    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool]: ...
    def frame(self) -> np.ndarray: ...


def _check_chunk(chunk: Any) -> np.ndarray:
    from rsd.policy.protocol import ActionChunk  # the protocol record; its constructor checks dtype/finiteness

    if not isinstance(chunk, ActionChunk):
        raise ShapeError(f"predict_chunk must return an rsd.policy.ActionChunk, got {type(chunk).__name__}.")
    actions = chunk.actions
    if actions.ndim != 2 or actions.shape[0] < 1 or actions.shape[1] != protocol.ACTION_DIM:
        raise ShapeError(f"ActionChunk.actions must be [C >= 1, {protocol.ACTION_DIM}], got {actions.shape}.")
    return actions


def run_episode(env: EpisodeEnv, policy: Any, instruction: str, init_state_index: int, max_steps: int, *,
                seed: int = protocol.SEED, on_frame: Callable[[np.ndarray], None] | None = None,
                on_step: Callable[[dict[str, Any], np.ndarray], None] | None = None) -> EpisodeOutcome:
    """One protocol episode. Never raises for episode failures: they come back as ``error`` / ``exception``.

    ``seed_everything(seed)``, ``policy.reset()``, ``obs = env.reset(init_state_index)``; 10 settle steps with
    the dummy action (their ``done`` is ignored, no frames); then up to ``max_steps`` policy actions from an
    open-loop queue refilled by ``policy.predict_chunk(obs, instruction)`` only when empty; success = ``done``
    from ``env.step``. ``on_frame(env.frame())`` is called before every policy action and once at the end
    (so a video has ``steps + 1`` frames); ``on_step(obs, action)`` right before each policy action.
    """
    steps = 0
    latencies: list[float] = []
    try:
        seed_everything(seed)
        policy.reset()
        obs = env.reset(init_state_index)
        for _ in range(protocol.NUM_STEPS_WAIT):
            obs, _done = env.step(protocol.dummy_action())
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
            obs, done = env.step(action)
            steps += 1
            if done:
                success = True
                break
        if on_frame is not None:
            on_frame(env.frame())
        return EpisodeOutcome(success=success, steps=steps, chunk_latencies_ms=tuple(latencies))
    except Exception as exc:  # recorded with its type, message and traceback; the caller stops the eval
        return EpisodeOutcome(success=False, steps=steps, chunk_latencies_ms=tuple(latencies),
                              error=f"{type(exc).__name__}: {exc}", traceback=_traceback.format_exc(),
                              exception=exc)


# ---------------------------------------------------------------------------------------------------- runners


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs (picklable)."""

    suite: str
    render: bool
    camera_size: int
    seed: int
    video: str
    out: Path


class _VideoSink:
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
        sink: _VideoSink | None = None
        try:
            env = self._get_env(key.task_id)
            name, instruction = env.task.name, env.task.instruction
            if s.video != "none":
                sink = _VideoSink(s.out / VIDEO_DIR / f"{key.suite}_task{key.task_id:02d}_trial{key.trial:02d}.mp4")
            outcome = run_episode(env, self.policy, instruction, key.init_state_index, protocol.max_steps_for(s.suite),
                                  seed=s.seed, on_frame=sink)
        except Exception as exc:  # env creation / video set-up: an episode error like any other
            outcome = EpisodeOutcome(False, 0, (), f"{type(exc).__name__}: {exc}", _traceback.format_exc(), exc)
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
            seed=s.seed, traceback=outcome.traceback)

    def close(self) -> None:
        if self._env is not None:
            env, self._env, self._env_task = self._env, None, None
            env.close()


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
        threads = max(1, (os.cpu_count() or 1) // n)
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
                        yield EpisodeResult(suite=key.suite, task_id=key.task_id, task_name="", instruction="",
                                            trial=key.trial, init_state_index=key.init_state_index, success=False,
                                            steps=0, error=err + f" while running task {key.task_id} trial "
                                            f"{key.trial}", latency_p50_ms=None, latency_p90_ms=None,
                                            chunk_latencies_ms=(), wall_s=0.0, video=None, seed=self.settings.seed)
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


# ---------------------------------------------------------------------------------------------------- summary


def _task_block(records: Sequence[EpisodeResult]) -> dict[str, Any]:
    successes = sum(r.success for r in records)
    est = rate_estimate(successes, len(records))
    lat = percentiles([x for r in records for x in r.chunk_latencies_ms])
    ok_steps = [r.steps for r in records if r.success]
    return {
        "n": est.n, "successes": est.successes, "rate": est.rate, "ci_low": est.ci_low, "ci_high": est.ci_high,
        "mean_steps": float(np.mean([r.steps for r in records])) if records else None,
        "mean_steps_success": float(np.mean(ok_steps)) if ok_steps else None,
        "latency_p50_ms": lat["p50"], "latency_p90_ms": lat["p90"],
        "errors": sum(r.error is not None for r in records),
    }


def summarize(records: Sequence[EpisodeResult], keys: Sequence[EpisodeKey]) -> dict[str, Any]:
    """``overall`` and ``per_task`` blocks over the requested ``keys`` (last record of each; missing ones are
    counted in ``missing``, not as failures). Each block: n, successes, rate, ci_low, ci_high (Wilson 95 %),
    mean_steps, mean_steps_success, latency_p50_ms, latency_p90_ms (over every chunk), errors."""
    latest = latest_by_key(records)
    wanted = [latest[k] for k in sorted(keys) if k in latest]
    per_task: dict[str, Any] = {}
    for tid in sorted({k.task_id for k in keys}):
        task_records = [r for r in wanted if r.task_id == tid]
        block = _task_block(task_records)
        named = [r for r in task_records if r.task_name]
        block["name"] = named[0].task_name if named else ""
        block["instruction"] = named[0].instruction if named else ""
        block["requested"] = sum(1 for k in keys if k.task_id == tid)
        per_task[str(tid)] = block
    overall = _task_block(wanted)
    overall["requested"] = len(keys)
    missing = len(keys) - len(wanted)
    return {"overall": overall, "per_task": per_task, "missing": missing,
            "complete": missing == 0 and overall["errors"] == 0,
            "other_records": len([k for k in latest if k not in set(keys)])}


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """The per-task table printed at the end of an eval."""
    head = f"{'task':>4}  {'n':>3}  {'succ':>4}  {'rate':>6}  {'95% CI':>13}  {'steps':>6}  {'p50 ms':>7}  " \
           f"{'p90 ms':>7}  {'err':>3}  name"
    lines = [head, "-" * len(head)]

    def row(label: str, b: Mapping[str, Any], name: str) -> str:
        if b["n"] == 0:
            return f"{label:>4}  {0:>3}  {'-':>4}  {'-':>6}  {'-':>13}  {'-':>6}  {'-':>7}  {'-':>7}  {0:>3}  {name}"
        ci = f"{100 * b['ci_low']:.1f}-{100 * b['ci_high']:.1f}"
        return (f"{label:>4}  {b['n']:>3}  {b['successes']:>4}  {100 * b['rate']:>5.1f}%  {ci:>13}  "
                f"{b['mean_steps']:>6.1f}  {_fmt_ms(b['latency_p50_ms']):>7}  {_fmt_ms(b['latency_p90_ms']):>7}  "
                f"{b['errors']:>3}  {name}")

    for tid, b in summary["per_task"].items():
        lines.append(row(tid, b, b.get("name", "")))
    lines.append("-" * len(head))
    lines.append(row("all", summary["overall"], ""))
    if summary.get("missing"):
        lines.append(f"({summary['missing']} requested episodes not run yet: rerun with --resume)")
    return "\n".join(lines)


def _plot(summary: Mapping[str, Any], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [(tid, b) for tid, b in summary["per_task"].items() if b["n"] > 0]
    rows = tasks + [("all", summary["overall"])] if tasks else []
    fig = Figure(figsize=(7.0, 0.35 * len(rows) + 1.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if rows:
        y = np.arange(len(rows))
        rates = np.array([100 * b["rate"] for _, b in rows])
        lo = rates - np.array([100 * b["ci_low"] for _, b in rows])
        hi = np.array([100 * b["ci_high"] for _, b in rows]) - rates
        colors = ["tab:blue"] * len(tasks) + ["tab:orange"]
        ax.barh(y, rates, xerr=np.stack([lo, hi]), color=colors, capsize=3, ecolor="black")
        ax.set_yticks(y, [f"task {t} ({b['successes']}/{b['n']})" if t != "all" else
                          f"all ({b['successes']}/{b['n']})" for t, b in rows])
        ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("success rate (%), Wilson 95% CI")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for label, dists in (("rsd", ("rsd",)), ("torch", ("torch",)), ("numpy", ("numpy",)), ("mujoco", ("mujoco",)),
                         ("robosuite", ("robosuite",)), ("libero", ("hf-libero", "libero"))):
        out[label] = None
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[label] = metadata.version(dist)
                break
    if out["rsd"] is None:  # running from a checkout without `pip install -e .`
        import rsd

        out["rsd"] = rsd.__version__
    return out


def _renderer(render: bool) -> dict[str, Any]:
    if not render:
        return {"backend": "none (--no-render)"}
    from rsd.sim.libero import select_renderer

    info = select_renderer()
    return {"backend": info.backend, "renderer": info.renderer, "vendor": info.vendor, "source": info.source}




# ---------------------------------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class EvalOutcome:
    summary: dict[str, Any]
    exit_code: int
    new_episodes: int


def episode_keys(config: EvalConfig, task_ids: Sequence[int]) -> list[EpisodeKey]:
    """Task-major list of the requested episodes."""
    return [EpisodeKey(config.suite, int(t), i) for t in task_ids for i in range(config.trials)]


def _default_runner(config: EvalConfig, policy_factory: Callable[[], Any]) -> Runner:
    settings = WorkerSettings(suite=config.suite, render=config.render, camera_size=config.camera_size,
                              seed=config.seed, video=config.video, out=config.out)
    if config.workers > 1:
        return ParallelRunner(settings, policy_factory, config.workers)
    return SerialRunner(settings, policy_factory)


def evaluate(config: EvalConfig, task_ids: Sequence[int], *, policy_factory: Callable[[], Any] | None = None,
             runner: Runner | None = None) -> EvalOutcome:
    """Run the requested episodes not yet recorded, append each result, write and print the summary.

    ``policy_factory`` (default ``make_policy(config.policy)``) is called once per process (must pickle for
    ``workers > 1``). ``runner`` replaces the LIBERO runner (tests). Exit code 1 when an episode errored.
    ``config.policy`` must be a spec rsd resolves (``rsd.policy.factory.policy_identity``: its files are hashed
    into ``run.json``) also when ``policy_factory`` or ``runner`` makes the policy: name the one they run.
    """
    out = config.out
    check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out} ({exc.strerror}): pass a directory you can write to.") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to --out {out} (permission denied): pass a directory you can write to.")
    if runner is None and config.workers > 1:
        limits.warn_worker_memory(config.workers)
    t_start = time.perf_counter()
    with exclusive_lock(out / LOCK_NAME, what=f"rsd eval is to write {out}",
                        fix="wait for that eval to finish, or choose another --out."):
        results_file = ResultsFile(out / RESULTS_NAME)
        has_records = results_file.exists_nonempty()
        if has_records and not config.resume:
            raise ConfigError(f"{results_file.path} already holds results: pass --resume to continue that eval, "
                              f"or choose another --out.")
        wanted = config.run_record()  # hashes the files behind --policy (once)
        check_run_record(out / RUN_NAME, wanted, resume=config.resume, has_records=has_records)
        started = RunRecordWriter(out / RUN_NAME, wanted)
        records = results_file.load(repair=True)
        keys = episode_keys(config, task_ids)
        latest = latest_by_key(records)
        done = {k for k in keys if k in latest and latest[k].error is None}  # errored ones are re-run
        todo = [k for k in keys if k not in done]
        if config.max_episodes is not None:
            todo = todo[: config.max_episodes]
        if runner is None:
            if policy_factory is None:
                from functools import partial

                from rsd.policy.factory import make_policy

                policy_factory = partial(make_policy, config.policy, suite=config.suite, device=config.device,
                                         fast=config.fast, trust_remote_code=config.trust_remote_code)
            runner = _default_runner(config, policy_factory) if todo else None
            if isinstance(runner, SerialRunner):  # its constructor made the policy: the start succeeded
                started()
            elif isinstance(runner, ParallelRunner):
                runner.on_ready = started

        bar = _progress(total=len(keys), initial=len(done), enabled=config.progress)
        new, errored, interrupted = 0, 0, False
        successes = sum(latest[k].success for k in done)
        try:
            if runner is not None and todo:
                for result in runner.results(todo):
                    started()  # no episode is recorded without its run.json
                    results_file.append(result)
                    records.append(result)
                    new += 1
                    errored += result.error is not None
                    successes += result.success
                    bar.update(1)
                    bar.set_postfix(success=f"{successes}/{bar.n}", refresh=False)
                    if result.error is not None:
                        print(f"\nrsd eval: task {result.task_id} trial {result.trial} failed with "
                              f"{result.error}\n{result.traceback or ''}", file=sys.stderr)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()

        summary = summarize(records, keys)
        summary.update({
            "suite": config.suite, "policy": config.policy, "seed": config.seed, "render": config.render,
            "camera_size": config.camera_size, "fast": config.fast, "trials": config.trials, "tasks": list(task_ids),
            "protocol": {"max_steps": config.max_steps, "num_steps_wait": protocol.NUM_STEPS_WAIT,
                         "dummy_action": list(protocol.DUMMY_ACTION), "success": "done flag of env.step",
                         "seeding": "random/numpy/torch seeded before every episode"},
            "renderer": _renderer(config.render),
            "versions": _versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": config.command,
            "wall_s": time.perf_counter() - t_start,
            "episodes_this_run": new,
            "episode_wall_s_total": float(sum(r.wall_s for r in latest_by_key(records).values())),
        })
        started()  # the runner did not raise: the run started (episodes may be cut by Ctrl-C)
        _write_json_atomic(out / SUMMARY_NAME, summary)
        if config.plot:
            _plot(summary, out / PLOT_NAME, f"{config.suite} · {config.policy}{' · fast' if config.fast else ''} "
                                            f"· seed {config.seed}")
    print(format_table(summary))
    print(f"wrote {out / SUMMARY_NAME}{', ' + str(out / PLOT_NAME) if config.plot else ''} and {out / RESULTS_NAME} "
          f"({new} new episodes)")
    if interrupted:
        print("rsd eval: interrupted; rerun with --resume to continue.", file=sys.stderr)
        return EvalOutcome(summary, 130, new)
    return EvalOutcome(summary, 1 if errored else 0, new)


class _NoBar:
    n = 0

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        bar = _NoBar()
        bar.n = initial
        return bar
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="ep", desc="rsd eval", dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- CLI


def parse_task_ids(text: str | None) -> tuple[int, ...] | None:
    """``"0,3,5-7"`` -> ``(0, 3, 5, 6, 7)``; None -> None (all tasks)."""
    if text is None:
        return None
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                ids.extend(range(a, b + 1))
            else:
                ids.append(int(part))
        except ValueError as exc:
            raise ConfigError(f"--tasks takes task ids like '0,3,5-7', got {text!r}.") from exc
    if not ids:
        raise ConfigError(f"--tasks {text!r} selects no task.")
    return tuple(sorted(set(ids)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="libero_spatial", choices=protocol.SUITES)
    parser.add_argument("--policy", required=True,
                        help="expert, expert-rfsq[:DIR], openvla-oft:PATH[@UNNORM_KEY], or a directory saved by "
                             "RSDPolicy/L1Policy (rsd.policy.factory)")
    parser.add_argument("--trials", type=int, default=protocol.NUM_TRIALS_PER_TASK,
                        help="trials per task; trial i starts from init state i (default 50)")
    parser.add_argument("--tasks", default=None, help="task ids, e.g. '0,3' or '0-4' (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="episodes run in this many spawned processes")
    parser.add_argument("--video", choices=VIDEO_MODES, default=None,
                        help="mp4 per episode: all, failures (default when rendering) or none")
    parser.add_argument("--render", action=argparse.BooleanOptionalAction, default=True,
                        help="render camera images (policies that see images need it; --no-render is ~10x faster)")
    parser.add_argument("--out", required=True,
                        help="results directory: a new or empty one, or an earlier rsd eval's (with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the eval recorded in --out")
    parser.add_argument("--seed", type=int, default=protocol.SEED)
    parser.add_argument("--camera-size", type=int, default=protocol.CAMERA_SIZE)
    parser.add_argument("--max-episodes", type=int, default=None, help="stop after this many new episodes")
    parser.add_argument("--device", default=None, help="device of learned policies (default: cuda if available)")
    parser.add_argument("--fast", action="store_true",
                        help="learned policies on rsd's CUDA fast path: a backbone with one (OpenVLA-OFT) compiled "
                             "+ CUDA graphs; a greedy RSD policy's heads+argmax+detokenize as one compiled CUDA "
                             "graph (codes = eager argmax up to float ties); a speculative RSD policy keeps its "
                             "decoder, only its backbone is sped up. Needs a CUDA --device and a learned policy "
                             "(error otherwise); recorded in run.json, --resume needs the same value")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a saved policy's backbone run its checkpoint's own Python code when its "
                             "policy.json asks for it (refused without this flag)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resolve_tasks(suite: str, tasks: tuple[int, ...] | None, trials: int) -> list[int]:
    from rsd.sim.libero import list_tasks, load_init_state_file

    specs = list_tasks(suite)
    ids = list(range(len(specs))) if tasks is None else list(tasks)
    bad = [t for t in ids if not 0 <= t < len(specs)]
    if bad:
        raise ConfigError(f"--tasks {bad} out of range: {suite} has tasks 0-{len(specs) - 1}.")
    for t in ids:
        n = load_init_state_file(specs[t].init_states_file).shape[0]
        if trials > n:
            raise ConfigError(f"--trials {trials} exceeds the {n} init states of {suite} task {t}.")
    return ids


def run(args: argparse.Namespace) -> int:
    video = args.video if args.video is not None else ("failures" if args.render else "none")
    config = EvalConfig(suite=args.suite, policy=args.policy, out=args.out, trials=args.trials,
                        tasks=parse_task_ids(args.tasks), workers=args.workers, video=video, render=args.render,
                        resume=args.resume, seed=args.seed, camera_size=args.camera_size,
                        max_episodes=args.max_episodes, command=shlex.join(["rsd", *sys.argv[1:]]),
                        progress=not args.no_progress, device=args.device, fast=args.fast,
                        trust_remote_code=args.trust_remote_code)
    check_out_dir(config.out)  # before LIBERO is imported to resolve the tasks
    task_ids = _resolve_tasks(config.suite, config.tasks, config.trials)
    return evaluate(config, task_ids).exit_code


if __name__ == "__main__":  # pragma: no cover
    from rsd.cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))

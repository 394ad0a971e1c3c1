"""The episodes of ``rsd sensitivity``: a recorded demo's actions, through the tokenizer with a known share of wrong
tokens, replayed open loop from the demo's own scene (the command and its report: ``rsd.sensitivity``).

One episode (:class:`ReplayJob` -> :meth:`ReplayWorker.run` -> a result row):

1. the demo's env actions ``[T, 7]`` are cut into consecutive chunks of C steps (the last one padded with its
   final action; only the demo's T steps are executed), ``ActionSpace.normalize`` -> ``RFSQTokenizer.encode`` ->
   codes ``[N, C, H, L]``;
2. ``rsd.corruption.corrupt_codes`` replaces ``round(fraction * eligible)`` tokens of the mode's layers, the
   eligible tokens being those of all N chunks (one draw per episode), from a generator seeded by ``(seed, demo,
   mode, fraction)`` only;
3. ``decode_from_indices`` -> ``ActionSpace.to_env`` (clip, un-normalize, gripper binarized: what rsd's learned
   policies execute) -> actions ``[T, 7]``;
4. ``rsd.sim.episode.run_episode`` over ``LiberoEnv.reset_to_state(rsd_scene_init_state)``: the protocol's 10
   settle steps, then the T actions open loop, then (``hold``) zero motion with the last gripper command until the
   suite's step budget; success = LIBERO's done flag at any step.

Conditions: ``raw`` (the recorded actions, no tokenizer: reproduces the recording exactly), ``roundtrip`` (the
tokenizer with no corruption, fraction 0 of every mode) and ``<mode>`` at ``fraction > 0``. The sim never sees
the tokenizer: it gets the finished actions through the policy protocol (:class:`ActionReplay`).
"""

from __future__ import annotations

import os
import time
import traceback as _traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = ["RAW", "ROUNDTRIP", "ReplayJob", "ChunkCodec", "ActionReplay", "ReplayWorker", "episode_rng",
           "scene_fixtures", "walk_fixtures", "demo_id", "Replayer"]

RAW = "raw"  # the recorded actions themselves
ROUNDTRIP = "roundtrip"  # through the tokenizer, no token corrupted


@dataclass(frozen=True)
class ReplayJob:
    """One episode: a demo (its actions and scene) under one condition. Picklable."""

    demo_id: str  # "<file name>:<demo name>"
    suite: str
    task_id: int
    scene_state: np.ndarray  # float64 [S], the scene before the settle steps (rsd_scene_init_state)
    actions: np.ndarray  # float64 [T, 7], env units
    condition: str  # RAW, ROUNDTRIP or a corruption mode
    fraction: float
    layers: tuple[int, ...]  # the mode's eligible layers (() for RAW and ROUNDTRIP)
    seed: int
    fixtures: dict[str, np.ndarray] | None = None  # the scene's fixture poses (scene_fixtures); None: the reset's

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.demo_id, self.condition, float(self.fraction))


def episode_rng(seed: int, demo_id: str, condition: str, fraction: float) -> np.random.Generator:
    """The corruption generator of one episode: depends on ``(seed, demo, condition, fraction)`` only."""
    tag = zlib.crc32(f"{demo_id}|{condition}|{fraction:.9f}".encode())
    return np.random.default_rng([int(seed), tag])


class ChunkCodec:
    """Env actions ``[T, 7]`` <-> codes ``[N, C, H, L]`` with a tokenizer and its action space."""

    def __init__(self, tokenizer: Any, action_space: Any) -> None:
        self.tokenizer = tokenizer.eval()
        self.space = action_space
        self.chunk_len = int(tokenizer.chunk_len)
        self.levels = int(tokenizer.num_levels)
        self.num_layers = int(tokenizer.num_layers)

    @classmethod
    def from_dir(cls, directory: str) -> "ChunkCodec":
        from rsd.policy.roundtrip import RFSQRoundTripPolicy  # the tokenizer + action space checks of expert-rfsq

        rt = RFSQRoundTripPolicy.from_dir(None, directory)
        return cls(rt.tokenizer, rt.action_space)

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """``[T, 7]`` env actions -> codes int64 ``[ceil(T / C), C, H, L]`` (the last chunk padded by repetition)."""
        import torch
        from einops import rearrange

        T, C = actions.shape[0], self.chunk_len
        n = -(-T // C)
        padded = np.concatenate([actions, np.repeat(actions[-1:], n * C - T, axis=0)])
        chunks = rearrange(padded, "(n c) a -> n c a", c=C)
        with torch.inference_mode():
            return self.tokenizer.encode(torch.from_numpy(self.space.normalize(chunks))).numpy()

    def decode(self, codes: np.ndarray, steps: int) -> np.ndarray:
        """codes ``[N, C, H, L]`` -> the first ``steps`` env-ready actions float64 ``[steps, 7]``."""
        import torch
        from einops import rearrange

        with torch.inference_mode():
            normalized = self.tokenizer.decode_from_indices(torch.from_numpy(codes)).numpy()  # [N, C, A]
        env = self.space.to_env(rearrange(normalized, "n c a -> (n c) a"))
        return np.asarray(env[:steps], dtype=np.float64)

    def actions_for(self, job: ReplayJob) -> tuple[np.ndarray, int, int]:
        """The actions ``job`` executes and its token counts ``(actions [T, 7], tokens, corrupted)``."""
        import torch

        from rsd.corruption import corrupt_codes

        if job.condition == RAW:
            return np.asarray(job.actions, dtype=np.float64), 0, 0
        codes = self.encode(job.actions)
        if job.condition != ROUNDTRIP and job.fraction > 0:
            rng = episode_rng(job.seed, job.demo_id, job.condition, job.fraction)
            bad, mask = corrupt_codes(torch.from_numpy(codes), job.fraction, job.layers, rng, levels=self.levels)
            codes, corrupted = bad.numpy(), int(mask.sum())
        else:
            corrupted = 0
        return self.decode(codes, job.actions.shape[0]), int(codes.size), corrupted


class ActionReplay:
    """A policy (``rsd.policy.protocol``) that returns fixed actions, C at a time, then holds still (zero motion,
    the last gripper command) when they run out."""

    def __init__(self, actions: np.ndarray, chunk_len: int) -> None:
        self.actions = np.asarray(actions, dtype=np.float32)
        self.chunk_len = int(chunk_len)
        self.hold = np.zeros(7, dtype=np.float32)
        self.hold[-1] = self.actions[-1, -1]
        self._next = 0

    def reset(self) -> None:
        self._next = 0

    def predict_chunk(self, observation: Any, instruction: str) -> Any:
        from rsd.policy.protocol import ActionChunk

        chunk = self.actions[self._next:self._next + self.chunk_len]
        self._next += len(chunk)
        if len(chunk) == 0:
            chunk = self.hold[None]
        return ActionChunk(actions=np.ascontiguousarray(chunk), info={})


class _FromScene:
    """The episode loop's env: ``reset`` starts the scene state given here (``LiberoEnv.reset_to_state``)."""

    def __init__(self, env: Any, state: np.ndarray, fixtures: dict[str, np.ndarray] | None) -> None:
        self.env, self.state, self.fixtures = env, state, fixtures

    def reset(self, _index: int) -> dict[str, Any]:
        return self.env.reset_to_state(self.state, self.fixtures)

    def step(self, action: np.ndarray, *, images: bool = True) -> tuple[dict[str, Any], bool]:
        return self.env.step(action, images=images)

    def frame(self) -> np.ndarray:
        return self.env.frame()


class ReplayWorker:
    """Runs replay episodes in this process: one codec, one unrendered env at a time (jobs come task-major)."""

    def __init__(self, tokenizer_dir: str, hold: bool) -> None:
        self.codec = ChunkCodec.from_dir(tokenizer_dir)
        self.hold = hold
        self._env: Any = None
        self._env_key: tuple[str, int] | None = None

    def _get_env(self, suite: str, task_id: int) -> Any:
        if self._env_key != (suite, task_id):
            self.close()
            from rsd.sim.libero import make_env

            self._env = make_env(suite, task_id, render=False)
            self._env_key = (suite, task_id)
        return self._env

    def run(self, job: ReplayJob) -> dict[str, Any]:
        from rsd.sim import protocol
        from rsd.sim.episode import EpisodeOutcome, run_episode

        t0 = time.perf_counter()
        row: dict[str, Any] = {"demo": job.demo_id, "suite": job.suite, "task_id": job.task_id,
                               "condition": job.condition, "fraction": job.fraction, "layers": list(job.layers),
                               "demo_steps": int(job.actions.shape[0]), "tokens": 0, "corrupted": 0}
        try:
            actions, row["tokens"], row["corrupted"] = self.codec.actions_for(job)
            arm = np.abs(actions[:, :-1] - job.actions[:, :-1])
            row["arm_mae"] = float(arm.mean())
            row["gripper_flips"] = int(np.sum(np.sign(actions[:, -1]) != np.sign(job.actions[:, -1])))
            env = self._get_env(job.suite, job.task_id)
            budget = max(len(actions), protocol.max_steps_for(job.suite)) if self.hold else len(actions)
            outcome = run_episode(_FromScene(env, job.scene_state, job.fixtures), ActionReplay(actions, self.codec.chunk_len),
                                  env.task.instruction, 0, budget, seed=job.seed)
        except Exception as exc:  # recorded with its traceback; the parent stops the run
            outcome = EpisodeOutcome.failed(exc)
        row.update(success=outcome.success, steps=outcome.steps, error=outcome.error,
                   wall_s=time.perf_counter() - t0)
        if outcome.traceback:
            row["traceback"] = outcome.traceback
        return row

    def close(self) -> None:
        if self._env is not None:
            env, self._env, self._env_key = self._env, None, None
            env.close()


def scene_fixtures(task: tuple[str, int, int, dict[int, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
    """The fixture poses of recorded fresh scenes: ``(suite, task_id, first seed, {seed: scene state})`` ->
    ``{seed: {fixture: pose [7]}}``. ``rsd collect`` ran scene seeds ``first, first + 1, ...`` in one new env per
    task, and a reset's fixture poses depend on the resets before it: the walk repeats them in a new env (about
    1 s a seed) and checks that each wanted seed rebuilds its recorded scene state exactly."""
    from rsd.errors import ConfigError
    from rsd.sim.libero import make_env

    suite, task_id, first, states = task
    out: dict[int, dict[str, np.ndarray]] = {}
    with make_env(suite, task_id, render=False) as env:
        if not env.fixture_poses():  # a scene without fixtures (libero_object): nothing to walk for
            return {seed: {} for seed in states}
        for seed in range(first, max(states) + 1):
            env.reset_scene(seed)
            if seed in states:
                if not np.array_equal(env.scene_state, states[seed]):
                    raise ConfigError(f"{suite} task {task_id}: scene seed {seed} no longer rebuilds the recorded "
                                      f"scene (LIBERO or MuJoCo changed since the recording?); rerun with "
                                      f"--no-fixtures to replay with the reset's own fixture poses.")
                out[seed] = env.fixture_poses()
    return out


def demo_id(path: str | Path, name: str) -> str:
    """``"<file name>:<demo name>"``: how the replaying commands name a recorded demo (results, fixture files)."""
    return f"{Path(path).name}:{name}"


def walk_fixtures(recorded: Sequence[tuple[Path, Any]], first_seeds: Mapping[Path, int | None],
                  walk: Callable[[list], Iterable[Any]] | None = None, *, fix: str) -> dict[str, dict[str, np.ndarray]]:
    """``{demo id: fixture poses}`` of recorded ``(file, demo)`` pairs: one :func:`scene_fixtures` walk per file and
    task, from the file's first scene seed (``first_seeds[file]``, its ``rsd_scene_seed_start``), mapped by ``walk``
    (in order; default: here, one after the other). ConfigError naming ``fix`` for a file without a first seed."""
    from rsd.errors import ConfigError

    tasks: dict[tuple[str, int, int, str], dict[int, np.ndarray]] = {}
    ids: dict[tuple[str, int, int, str, int], str] = {}
    for path, d in recorded:
        first = first_seeds[path]
        if first is None:
            raise ConfigError(f"{path} has no rsd_scene_seed_start attribute (not recorded by `rsd collect`?): {fix}.")
        key = (str(d.attrs["rsd_suite"]), int(d.attrs["rsd_task_id"]), int(first), str(path))
        seed = int(d.attrs["rsd_scene_seed"])
        tasks.setdefault(key, {})[seed] = np.asarray(d.attrs["rsd_scene_init_state"])
        ids[key + (seed,)] = demo_id(path, d.name)
    keys = list(tasks)
    args = [(k[0], k[1], k[2], tasks[k]) for k in keys]
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, poses in zip(keys, walk(args) if walk is not None else map(scene_fixtures, args)):
        for seed, pose in poses.items():
            out[ids[key + (seed,)]] = pose
    return out


_WORKER: ReplayWorker | None = None


def _init_worker(tokenizer_dir: str, hold: bool, threads: int) -> None:
    global _WORKER
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    _WORKER = ReplayWorker(tokenizer_dir, hold)


def _run_in_worker(job: ReplayJob) -> dict[str, Any]:
    assert _WORKER is not None, "worker not initialised"
    try:
        return _WORKER.run(job)
    except BaseException as exc:  # never lose a job's key: the parent records the error
        return {"demo": job.demo_id, "condition": job.condition, "fraction": job.fraction, "success": False,
                "error": f"{type(exc).__name__}: {exc}", "traceback": _traceback.format_exc()}


class Replayer:
    """Runs the walks and the episodes: in this process for ``workers == 1``, else in ``workers`` ``spawn``-started
    processes (each with its own tokenizer and LIBERO env, as ``rsd eval`` workers). Results come in completion
    order. Use as a context manager (the pool is terminated on exit)."""

    def __init__(self, tokenizer_dir: str, *, hold: bool, workers: int) -> None:
        self.worker: ReplayWorker | None = None
        self.pool: Any = None
        if workers <= 1:
            self.worker = ReplayWorker(tokenizer_dir, hold)
        else:
            import multiprocessing as mp

            from rsd.limits import usable_cores

            threads = max(1, usable_cores() // workers)
            self.pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                     initargs=(tokenizer_dir, hold, threads))

    def fixtures(self, tasks: Sequence[tuple[str, int, int, dict[int, np.ndarray]]]) -> Iterator[Any]:
        """:func:`scene_fixtures` of every task, in the order of ``tasks``."""
        if self.pool is None:
            return map(scene_fixtures, tasks)
        return self.pool.imap(scene_fixtures, tasks)  # in order: the caller zips them with its tasks

    def results(self, jobs: Sequence[ReplayJob]) -> Iterator[dict[str, Any]]:
        """One result row per job."""
        if self.pool is None:
            assert self.worker is not None
            return map(self.worker.run, jobs)
        return self.pool.imap_unordered(_run_in_worker, jobs, chunksize=1)

    def __enter__(self) -> "Replayer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        if self.worker is not None:
            self.worker.close()

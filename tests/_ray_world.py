"""Workers and policies for the tests of ``rsd eval --backend ray`` (``rsd.eval.ray_backend.RayRunner``).

They live in an importable module (``tests._ray_world``) because Ray actors unpickle them in their own processes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from rsd.eval.evaluation import EvalConfig
from rsd.eval.ray_backend import RayRunner
from rsd.eval.records import EpisodeKey, EpisodeResult
from rsd.eval.runners import EpisodeWorker, WorkerSettings
from rsd.policy.protocol import ActionChunk
from tests._fake_env import FakeEnv

SEEN_ENV = ("RSD_HOME", "MUJOCO_GL", "LIBERO_CONFIG_PATH", "OMP_NUM_THREADS", "PYOPENGL_PLATFORM")
SUITE = "libero_spatial"
TASKS, TRIALS = (0, 1), 4


def fake_config(out: Path, trials: int = TRIALS, tasks: tuple[int, ...] = TASKS) -> EvalConfig:
    """An eval of the fake world. run.json records the expert (a spec rsd can hash); the runner runs the policies
    of this module."""
    return EvalConfig(suite=SUITE, policy="expert", out=out, trials=trials, tasks=tasks, render=False, video="none",
                      progress=False, plot=False)


def fake_settings(out: Path) -> WorkerSettings:
    return WorkerSettings(suite=SUITE, render=False, camera_size=128, seed=7, video="none", out=out)


def fake_runner(out: Path, factory: Any, workers: int = 2, **kw: Any) -> RayRunner:
    """A ``RayRunner`` whose actors run :class:`FakeEnvWorker` s."""
    runner = RayRunner(fake_settings(out), factory, workers, **kw)
    runner.worker_factory = FakeEnvWorker
    return runner


class FakeEnvWorker(EpisodeWorker):
    """``EpisodeWorker`` on ``FakeEnv`` (no LIBERO): task t succeeds once the summed dx reaches ``0.2 * (t + 1)``,
    except trial 3 of every task, whose target is out of reach (a failed episode of the full step budget)."""

    def _get_env(self, task_id: int) -> Any:
        if self._env_task != task_id:
            self.close()
            self._env = FakeEnv(target=0.2 * (task_id + 1))
            self._env.task = SimpleNamespace(name=f"fake_task_{task_id}", instruction=f"push {task_id}")
            self._env_task = task_id
        return self._env

    def run(self, key: EpisodeKey) -> EpisodeResult:
        env = self._get_env(key.task_id)
        env.target = 1e9 if key.trial == 3 else 0.2 * (key.task_id + 1)
        if hasattr(self.policy, "key"):
            self.policy.key = (key.task_id, key.trial)
        return super().run(key)

    def close(self) -> None:
        self._env, self._env_task = None, None


class KeyAwareWorker(EpisodeWorker):
    """The real ``EpisodeWorker`` (LIBERO) that tells its policy which episode it runs (``policy.key``)."""

    def run(self, key: EpisodeKey) -> EpisodeResult:
        self.policy.key = (key.task_id, key.trial)
        return super().run(key)


class Push:
    """dx = 0.05 at every step, gripper open: FakeEnv's episodes end after a known number of steps."""

    def __init__(self, report_dir: str | None = None, barrier: int = 0) -> None:
        if report_dir is not None:  # what the process that made this policy sees: one JSON file per process
            import torch

            seen = {k: os.environ.get(k) for k in SEEN_ENV}
            Path(report_dir, f"actor-{os.getpid()}.json").write_text(json.dumps(
                {"env": seen, "torch_threads": torch.get_num_threads(), "pid": os.getpid()}))
            deadline = time.monotonic() + 60  # barrier: wait until that many processes have made their policy
            while len(list(Path(report_dir).glob("actor-*.json"))) < barrier and time.monotonic() < deadline:
                time.sleep(0.05)

    def reset(self) -> None:
        pass

    def predict_chunk(self, observation: dict, instruction: str) -> ActionChunk:
        actions = np.zeros((8, 7), np.float32)
        actions[:, 0] = 0.05
        actions[:, 6] = -1.0
        return ActionChunk(actions, {})


class KillsItselfOnce:
    """Wraps a policy; on episode ``target`` (task, trial) it SIGKILLs its own process at its ``chunk``-th chunk,
    the first time only (``marker``, a file, is created just before: a re-run of that episode goes through).
    ``always=True``: every time (an episode that kills every actor it runs on). ``key`` is set by the worker."""

    def __init__(self, inner: Any, target: tuple[int, int], marker: str, chunk: int = 2, always: bool = False) -> None:
        self.inner, self.target, self.marker, self.chunk, self.always = inner, tuple(target), marker, chunk, always
        self.key: tuple[int, int] | None = None
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0
        self.inner.reset()

    def predict_chunk(self, observation: dict, instruction: str) -> ActionChunk:
        self.calls += 1
        if self.key == self.target and self.calls == self.chunk and (self.always or not os.path.exists(self.marker)):
            with open(self.marker, "a") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.predict_chunk(observation, instruction)


def push_killing_once(target: tuple[int, int], marker: str, always: bool = False) -> KillsItselfOnce:
    return KillsItselfOnce(Push(), target, marker, chunk=1, always=always)  # Push's short episodes have 1 chunk


def expert_killing_once(target: tuple[int, int], marker: str) -> KillsItselfOnce:
    from rsd.sim.experts import ScriptedExpert

    return KillsItselfOnce(ScriptedExpert(), target, marker)


class BadCheckpoint:
    """A policy factory that fails as a missing checkpoint does."""

    def __call__(self) -> Any:
        from rsd.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError("no policy at /nowhere/policy.json: pass a directory saved by save_pretrained")


def expert_reporting_setup(report_dir: str) -> Any:
    """A policy factory for LIBERO actors: the scripted expert, after writing what ``rsd.sim.setup`` resolves in
    this process (``setup-<pid>.json``: LIBERO's config directory, rsd's home, the renderer variables)."""
    from rsd.sim.experts import ScriptedExpert
    from rsd.sim.setup import ensure_libero_config, rsd_home

    Path(report_dir, f"setup-{os.getpid()}.json").write_text(json.dumps(
        {"config_dir": str(ensure_libero_config()), "rsd_home": str(rsd_home()),
         "env": {k: os.environ.get(k) for k in SEEN_ENV}}))
    return ScriptedExpert()


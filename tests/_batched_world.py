"""Env workers and policies for the tests of ``rsd eval --backend batched`` (``rsd.eval.batched.BatchedRunner``) on
``FakeEnv`` (no LIBERO). The workers live in an importable module because the spawned env processes unpickle them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rsd.eval.records import EpisodeKey, EpisodeResult
from rsd.eval.runners import EpisodeWorker, WorkerSettings
from tests._fake_env import FakeEnv
from tests._ray_world import KeyAwareWorker, KillsItselfOnce

SUITE = "libero_spatial"
TARGET = 1.0  # FakeEnv's summed dx to succeed, per task number
IMAGE = 32  # tests.policy_factory.IMAGE (not imported: that module imports the model code a worker must not)
# what an env worker must never import: the model pipeline stays in the policy server
MODEL_MODULES = ("rsd.policy.learned", "rsd.policy.batching", "rsd.backbones", "rsd.heads", "rsd.speculative",
                 "rsd.tokenizer", "rsd.fastpath")


def settings(out: Path) -> WorkerSettings:
    return WorkerSettings(suite=SUITE, render=True, camera_size=IMAGE, seed=7, video="none", out=out)


class TinyEnvWorker(EpisodeWorker):
    """``EpisodeWorker`` on ``FakeEnv`` rendering ``IMAGE`` px cameras (what the tiny policies read): task t
    succeeds once the summed dx reaches ``TARGET * (t + 1)``. Tells its policy which episode it runs (``policy.key``,
    when it has one). ``report_dir``: after each episode, the model modules this process has imported and whether
    it initialised CUDA go to ``worker-<pid>.json`` there."""

    def __init__(self, settings: WorkerSettings, policy: Any, report_dir: str | None = None) -> None:
        super().__init__(settings, policy)
        self.report_dir = report_dir

    def _get_env(self, task_id: int) -> Any:
        if self._env_task != task_id:
            self._env = FakeEnv(target=TARGET * (task_id + 1), render=True, image_size=IMAGE)
            self._env.task = SimpleNamespace(name=f"fake_task_{task_id}", instruction=f"push {task_id}")
            self._env_task = task_id
        return self._env

    def run(self, key: EpisodeKey) -> EpisodeResult:
        if hasattr(self.policy, "key"):
            self.policy.key = (key.task_id, key.trial)
        result = super().run(key)
        if self.report_dir is not None:
            cuda = sys.modules.get("torch.cuda")
            Path(self.report_dir, f"worker-{os.getpid()}.json").write_text(json.dumps({
                "model_modules": sorted(m for m in sys.modules if m.startswith(MODEL_MODULES)),
                "cuda_initialized": bool(cuda is not None and cuda.is_initialized())}))
        return result

    def close(self) -> None:
        self._env, self._env_task = None, None


def reporting_worker(settings: WorkerSettings, client: Any, report_dir: str, barrier: int = 0) -> TinyEnvWorker:
    """A ``TinyEnvWorker`` reporting to ``report_dir``; with ``barrier``, it first waits (up to 120 s) until that many
    workers have been made, so that they all run episodes at the same time (their chunks can share batches)."""
    import time

    Path(report_dir, f"made-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(Path(report_dir).glob("made-*"))) < barrier and time.monotonic() < deadline:
        time.sleep(0.05)
    return TinyEnvWorker(settings, client, report_dir)


def killing_worker(settings: WorkerSettings, client: Any, target: tuple[int, int], marker: str) -> TinyEnvWorker:
    """A worker whose process SIGKILLs itself at the 2nd chunk of episode ``target`` (task, trial), the first time
    only (``marker``: tests._ray_world.KillsItselfOnce)."""
    return TinyEnvWorker(settings, KillsItselfOnce(client, target, marker, chunk=2))


def killing_libero_worker(settings: WorkerSettings, client: Any, target: tuple[int, int],
                          marker: str) -> EpisodeWorker:
    """The real ``EpisodeWorker`` (LIBERO), whose process SIGKILLs itself at the 2nd chunk of episode ``target``,
    the first time only."""
    return KeyAwareWorker(settings, KillsItselfOnce(client, target, marker, chunk=2))


class DeadOnTask1:
    """A policy factory (picklable: a Ray policy server unpickles it): the saved policy at ``path``, whose backbone's
    output for task 1's instruction ("push 1") is all zero, a dead hidden state. Imports the model code only when
    called (env workers import this module)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self) -> Any:
        import torch

        from rsd.policy import load_policy

        policy = load_policy(self.path, decode="exact")
        encode = policy.backbone.encode

        def encode_rows(observation: dict, instruction: Any, **kw: Any) -> Any:
            hidden = encode(observation, instruction, **kw)
            dead = torch.tensor([text == "push 1" for text in instruction])
            return torch.where(dead[:, None], torch.zeros_like(hidden), hidden)

        policy.backbone.encode = encode_rows
        return policy


def saved_tiny_policy(directory: Path) -> Path:
    """A tiny speculative RSD policy saved to ``directory`` (what the batched and the Ray policy-server tests load)."""
    from tests.policy_factory import tiny_rsd_policy

    tiny_rsd_policy(speculative=True).save_pretrained(directory)
    return directory


def exact_policy_factory(saved: Path) -> Any:
    """Picklable: loads ``saved`` decoding speculative exact, every chunk checked against greedy."""
    import functools

    from rsd.policy import load_policy

    return functools.partial(load_policy, saved, decode="exact")


TINY_TASKS, TINY_TRIALS = (0, 1), 3


def tiny_keys() -> list[EpisodeKey]:
    """The episodes of the policy-server tests: trials 0-2 of tasks 0 and 1."""
    return [EpisodeKey(SUITE, t, i) for t in TINY_TASKS for i in range(TINY_TRIALS)]


def outcome(r: EpisodeResult) -> tuple:
    """What must agree between two runners: success, steps, error, chunks, and how the chunks decoded."""
    spec = r.speculative
    return (r.success, r.steps, r.error, len(r.chunk_latencies_ms), spec.chunks, spec.greedy_checked,
            spec.greedy_mismatched)

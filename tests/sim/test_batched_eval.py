"""``rsd eval --backend batched`` on real LIBERO, unrendered, with the shipped low-dim RSD policy decoding
speculatively (``--decode exact``, every chunk checked against greedy): two env workers served by the policy in the
``rsd eval`` process give the episodes of ``--backend local``, episode for episode (success, steps, chunks); a worker
killed in the middle of an episode is replaced, the episode re-run and recorded once.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_batched_eval.py -q`` (about 70 s on an idle
2-core machine: libero_object task 0, trials 0-3 through the command line with each backend, then 2 of them with a
kill).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sim

if importlib.util.find_spec("libero") is None:
    pytest.skip("LIBERO is not installed: run `bash scripts/setup.sh`", allow_module_level=True)

from rsd import eval as ev  # noqa: E402
from rsd.eval.batched import BatchedRunner  # noqa: E402
from rsd.eval.runners import WorkerSettings  # noqa: E402
from rsd.sim import protocol  # noqa: E402
from tests._batched_world import killing_libero_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUITE, TASK, TRIALS = "libero_object", 0, 4
POLICY = ("--policy", "lowdim", "--decode", "exact", "--device", "cpu")


def _eval(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rsd.cli", "eval", "--suite", SUITE, "--tasks", str(TASK), "--trials",
                           str(TRIALS), *POLICY, "--no-render", "--no-progress", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


def _outcomes(out: Path) -> dict[tuple[int, int], tuple]:
    eps = [json.loads(x) for x in (out / ev.RESULTS_NAME).read_text().splitlines() if x.strip()]
    assert len(eps) == len({(r["task_id"], r["trial"]) for r in eps}), "an episode was recorded twice"
    assert all(r["error"] is None and r["speculative"]["greedy_mismatched"] == 0 for r in eps)
    return {(r["task_id"], r["trial"]): (r["success"], r["steps"], len(r["chunk_latencies_ms"]),
                                         r["speculative"]["chunks"]) for r in eps}


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict[tuple[int, int], tuple]:
    out = tmp_path_factory.mktemp("local") / "run"
    res = _eval(out, "--backend", "local")
    assert res.returncode == 0, res.stderr[-3000:]
    got = _outcomes(out)
    assert len(got) == TRIALS
    return got


def test_batched_backend_equals_local_episode_for_episode(local, tmp_path: Path) -> None:
    out = tmp_path / "batched"
    res = _eval(out, "--backend", "batched", "--workers", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _outcomes(out) == local  # differences would be argmax ties flipped by the batch's float order: none here
    assert json.loads((out / ev.RUN_NAME).read_text())["backend"] == "batched"
    stats = json.loads((out / ev.SUMMARY_NAME).read_text())["batched"]
    assert stats["chunks"] == sum(v[2] for v in local.values()) and stats["workers"] == 2
    assert set(stats["batch_sizes"]) <= {"1", "2"} and stats["latency_ms"]
    assert "policy server: " in res.stdout


def test_a_killed_env_worker_s_episode_runs_again_and_is_recorded_once(local, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from rsd.policy.factory import make_policy

    marker = tmp_path / "killed"
    settings = WorkerSettings(suite=SUITE, render=False, camera_size=protocol.CAMERA_SIZE, seed=protocol.SEED,
                              video="none", out=tmp_path / "run")
    runner = BatchedRunner(settings, functools.partial(make_policy, "lowdim", device="cpu", decode="exact"), 2)
    runner.worker_factory = functools.partial(killing_libero_worker, target=(TASK, 1), marker=str(marker))
    config = ev.EvalConfig(suite=SUITE, policy="lowdim", out=tmp_path / "run", trials=2, tasks=(TASK,), render=False,
                           video="none", progress=False, plot=False, decode="exact", device="cpu", backend="batched")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command line runs (OMP_NUM_THREADS=1): the same float order as `local`
    try:
        outcome = ev.evaluate(config, [TASK], runner=runner)
    finally:
        torch.set_num_threads(threads)
    assert outcome.exit_code == 0 and marker.exists() and runner.restarts == 1
    assert _outcomes(tmp_path / "run") == {k: v for k, v in local.items() if k[1] < 2}
    err = capsys.readouterr().err
    assert f"while running task {TASK} trial 1 (exit code -9); re-running it on a fresh worker" in err
    assert outcome.summary["batched"]["worker_restarts"] == 1

"""Shards, ``rsd merge`` and ``--backend slurm`` (submitit's LocalExecutor) against real LIBERO: the merged shards
equal one process's run of the same episodes, episode for episode; a cut shard resumes with nothing lost and nothing
counted twice; with the SLURM backend, a shard whose array task is killed mid-run continues when the same command
is run again, and the array tasks set LIBERO up themselves with the submitting environment.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_eval_distributed.py -q`` (about 13 unrendered
expert episodes of 2 tasks x 2 trials; about 75 s on the idle 2-core box).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.sim

if importlib.util.find_spec("libero") is None:
    pytest.skip("LIBERO is not installed: run `bash scripts/setup.sh`", allow_module_level=True)

from rsd import cli  # noqa: E402
from rsd import eval as ev  # noqa: E402
from rsd.eval.shards import Shard  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUITE, TASKS, TRIALS = "libero_spatial", (0, 1), 2
# what an episode is, in both runs (latencies and wall time aside)
SAME = ("task_id", "trial", "task_name", "instruction", "init_state_index", "success", "steps", "error", "seed")


def _config(out: Path, **kw) -> ev.EvalConfig:
    base = dict(suite=SUITE, policy="expert", out=out, trials=TRIALS, tasks=TASKS, render=False, video="none",
                progress=False, plot=False)
    base.update(kw)
    return ev.EvalConfig(**base)


def _episodes(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / ev.RESULTS_NAME).read_text().splitlines() if x.strip()]


def _same(out: Path) -> list[tuple]:
    return [tuple(r[k] for k in SAME) for r in _episodes(out)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    assert ev.evaluate(_config(out), TASKS).exit_code == 0
    assert len(_episodes(out)) == 4
    return out


def test_cut_shard_resumed_and_merged_equals_a_single_run(single: Path, tmp_path: Path, capsys) -> None:
    s0, s1, merged = tmp_path / "s0", tmp_path / "s1", tmp_path / "merged"
    assert ev.evaluate(_config(s0, shard=Shard(0, 2), max_episodes=1), TASKS).exit_code == 0  # cut after 1 of 2
    assert ev.evaluate(_config(s1, shard=Shard(1, 2)), TASKS).exit_code == 0
    assert cli.main(["merge", str(merged), str(s0), str(s1)]) == 3  # the cut episode is missing, not dropped
    assert "libero_spatial task 1 trial 0: not run yet by shard 0/2" in capsys.readouterr().err

    resumed = ev.evaluate(_config(s0, shard=Shard(0, 2), resume=True), TASKS)
    assert resumed.exit_code == 0 and resumed.new_episodes == 1
    assert [(r["task_id"], r["trial"]) for r in _episodes(s0)] == [(0, 0), (1, 0)]  # nothing counted twice

    assert cli.main(["merge", str(merged), str(s0), str(s1)]) == 0
    assert _same(merged) == _same(single)  # episode for episode, in the canonical order
    summary = json.loads((merged / ev.SUMMARY_NAME).read_text())
    reference = json.loads((single / ev.SUMMARY_NAME).read_text())
    keep = ("n", "successes", "rate", "ci_low", "ci_high", "mean_steps", "errors")
    assert {k: summary["overall"][k] for k in keep} == {k: reference["overall"][k] for k in keep}
    assert summary["versions"] == reference["versions"] and summary["complete"]
    assert (merged / ev.PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _slurm_args(out: Path) -> list[str]:
    return [sys.executable, "-m", "rsd.cli", "eval", "--suite", SUITE, "--policy", "expert", "--tasks", "0,1",
            "--trials", str(TRIALS), "--no-render", "--no-progress", "--backend", "slurm", "--shards", "2",
            "--slurm-executor", "local", "--slurm-time", "10", "--out", str(out)]


def _slurm_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RSD_HOME=str(home),
               MUJOCO_GL=os.environ["MUJOCO_GL"])  # set in this process by the LIBERO set-up of `single`
    env.pop("LIBERO_CONFIG_PATH", None)
    return env


def _kill_holder(shard_dir: Path, deadline: float) -> None:
    """SIGKILL the array task writing ``shard_dir`` (the pid in its lock) once it has recorded one episode."""
    results, lock = shard_dir / ev.RESULTS_NAME, shard_dir / ev.LOCK_NAME
    while time.monotonic() < deadline:
        if results.is_file() and results.read_bytes().count(b"\n") >= 1:
            holder = lock.read_text()
            assert results.read_bytes().count(b"\n") == 1, "the shard finished before it could be killed"
            os.kill(int(holder.split()[1]), signal.SIGKILL)
            return
        time.sleep(0.05)
    raise AssertionError(f"{results} got no episode in time")


def test_slurm_backend_shard_killed_then_rerun_equals_a_single_run(single: Path, tmp_path: Path) -> None:
    out, home = tmp_path / "out", tmp_path / "rsd_home"
    proc = subprocess.Popen(_slurm_args(out), cwd=ROOT, env=_slurm_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _kill_holder(out / "shards" / "shard-0-of-2", time.monotonic() + 200)  # shard 0's job dies mid-run
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, stderr[-3000:]  # a job failed: listed, merged with the gap
    assert "these shards' jobs failed" in stderr and "shard 0/2 (job" in stderr
    assert "1 of 4 requested episodes are missing" in stderr
    assert "libero_spatial task 1 trial 0: not run yet by shard 0/2" in stderr

    rerun = subprocess.run(_slurm_args(out), cwd=ROOT, env=_slurm_env(home), capture_output=True, text=True,
                           timeout=300)  # the same command again: shard 0 continues, shard 1 is not resubmitted
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 of 2 shards already complete; submitting 1" in rerun.stderr
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert [(j["shard"]["index"], j["new_episodes"]) for j in jobs] == [(0, 1)]
    assert jobs[0]["libero_imported_before_setup"] is False  # LIBERO set up in the job, from the submitting env
    assert jobs[0]["env"]["RSD_HOME"] == str(home) and jobs[0]["env"]["MUJOCO_GL"] == os.environ["MUJOCO_GL"]
    assert jobs[0]["env"]["LIBERO_CONFIG_PATH"] == str(home / "libero")
    for shard in ("shard-0-of-2", "shard-1-of-2"):
        assert len(_episodes(out / "shards" / shard)) == 2  # nothing lost, nothing counted twice
    assert _same(out) == _same(single)
    summary = json.loads((out / ev.SUMMARY_NAME).read_text())
    assert summary["complete"] and summary["backend"] == "slurm" and summary["missing_episodes"] == []

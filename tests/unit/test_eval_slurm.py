"""``--backend slurm`` without a cluster: the options become the right sbatch lines, a rerun submits nothing for
complete shards and merges, and a rerun with other settings or another shard count is refused before anything is
submitted (rsd.eval.slurm; the end-to-end run through submitit's LocalExecutor is tests/sim/test_eval_distributed.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from rsd import eval as ev
from rsd.errors import ConfigError, MergeError, ResumeMismatchError
from rsd.eval import slurm
from tests._eval_stubs import FakeRunner

pytestmark = pytest.mark.unit


def _config(out: Path, **kw) -> ev.EvalConfig:
    base = dict(suite="libero_spatial", policy="expert", out=out, trials=2, render=False, video="none",
                progress=False, plot=False, backend="slurm")
    base.update(kw)
    return ev.EvalConfig(**base)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    return parser.parse_args(["--out", "o", *argv])


def test_options_become_sbatch_lines(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):  # submitit only looks for them here; nothing is submitted
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    options = slurm.options_from_args(_args(
        "--backend", "slurm", "--shards", "4", "--slurm-partition", "gpu", "--slurm-time", "30",
        "--slurm-gpus-per-task", "1", "--slurm-mem-gb", "16", "--slurm-array-parallelism", "2",
        "--slurm-opt", "account=proj", "--slurm-opt", "qos=high"))
    executor = slurm._executor(options, tmp_path / "jobs", workers=3)
    executor.parameters["map_count"] = 4
    text = executor._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --gpus-per-task=1", "#SBATCH --mem=16GB",
                 "#SBATCH --array=0-3%2", "#SBATCH --cpus-per-task=3", "#SBATCH --account=proj",
                 "#SBATCH --qos=high"):
        assert line in text


def test_the_slurm_executor_needs_slurm(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="--slurm-executor local"):
        slurm._executor(slurm.SlurmOptions(shards=2), tmp_path, workers=1)


def _run_shards_by_hand(out: Path, count: int, **kw) -> None:
    for cfg in slurm.shard_configs(_config(out, **kw), count):
        ev.evaluate(cfg, [0, 1], runner=FakeRunner())


def test_a_rerun_with_every_shard_complete_submits_nothing_and_merges(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    _run_shards_by_hand(out, 2)
    options = slurm.SlurmOptions(shards=2, executor="local")
    env = {"RSD_HOME": None}
    assert slurm.run_slurm(_config(out, command="rsd eval x"), [0, 1], options, env) == 0
    assert "2 of 2 shards already complete; submitting 0" in capsys.readouterr().err
    summary = json.loads((out / ev.SUMMARY_NAME).read_text())
    assert summary["overall"]["n"] == 4 and summary["missing_episodes"] == [] and summary["backend"] == "slurm"
    assert slurm.run_slurm(_config(out), [0, 1], options, env) == 0  # and again: OUT is an earlier run of it


def test_a_rerun_with_other_settings_or_shard_count_is_refused_before_submitting(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run_shards_by_hand(out, 2)
    with pytest.raises(ResumeMismatchError, match="seed"):
        slurm.run_slurm(_config(out, seed=8), [0, 1], slurm.SlurmOptions(shards=2, executor="local"), {})
    with pytest.raises(ConfigError, match="another shard count"):
        slurm.run_slurm(_config(out), [0, 1], slurm.SlurmOptions(shards=3, executor="local"), {})
    assert not (out / slurm.JOBS_DIR).exists()  # nothing was submitted
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="not the output of an earlier rsd merge"):
        slurm.check_out(foreign, 2)


def test_the_array_task_sets_the_submitting_environment(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake_evaluate(config, task_ids):
        seen.update(config=config, env={k: os.environ.get(k) for k in slurm.ENV_NAMES})
        return ev.EvalOutcome({}, 0, 2)

    monkeypatch.setattr(slurm, "evaluate", fake_evaluate)
    for name in slurm.ENV_NAMES:  # e.g. what this host's own set-up chose, not the user's: restored after the test
        monkeypatch.setenv(name, "set-here")
    cfg = slurm.shard_configs(_config(tmp_path / "out"), 2)[1]
    report = slurm.run_shard(cfg, [0, 1], {"RSD_HOME": str(tmp_path / "home"), "MUJOCO_GL": None,
                                           "PYOPENGL_PLATFORM": None, "LIBERO_CONFIG_PATH": None})
    assert seen["env"] == {"RSD_HOME": str(tmp_path / "home"), "MUJOCO_GL": None, "PYOPENGL_PLATFORM": None,
                           "LIBERO_CONFIG_PATH": None}
    assert seen["config"].shard.index == 1
    assert seen["config"].out == tmp_path / "out" / "shards" / "shard-1-of-2" and seen["config"].resume
    assert report["shard"] == {"index": 1, "count": 2} and report["new_episodes"] == 2


SBATCH = Path(__file__).resolve().parents[2] / "scripts" / "slurm_eval.sbatch"


@pytest.mark.parametrize(("array_min", "code"), [("0", 0), ("1", 2)])
def test_the_sbatch_recipe_runs_its_array_task_shard_with_resume(tmp_path: Path, array_min: str, code: int) -> None:
    import subprocess

    env = dict(os.environ, OUT=str(tmp_path / "run"), SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_COUNT="4",
               SLURM_ARRAY_TASK_MIN=array_min, RSD="echo")
    res = subprocess.run(["bash", str(SBATCH), "--suite", "libero_object", "--policy", "lowdim"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == code, res.stderr
    if code == 0:
        assert res.stdout.split() == ["eval", "--suite", "libero_object", "--policy", "lowdim", "--shard", "3/4",
                                      "--out", f"{tmp_path}/run/shards/shard-3-of-4", "--resume", "--no-progress"]
    else:
        assert "--array=0-(N-1)" in res.stderr

"""``rsd merge``: shard runs (made by ``evaluate`` with a fake runner, no LIBERO) combine into one run equal to a
single run of the same episodes; shards that do not belong together are refused; gaps are listed, never dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rsd import cli
from rsd import eval as ev
from rsd.errors import ConfigError, MergeError
from rsd.eval.compare import load_run
from rsd.eval.merge import MISSING_EXIT, merge_runs
from rsd.eval.shards import Shard
from tests._eval_stubs import FakeRunner

pytestmark = pytest.mark.unit

TASKS = [0, 3]
TRIALS = 3  # 6 episodes: (0,0) (0,1) (0,2) (3,0) (3,1) (3,2)


def _config(out: Path, **kw) -> ev.EvalConfig:
    base = dict(suite="libero_spatial", policy="expert", out=out, trials=TRIALS, render=False, video="none",
                progress=False, plot=False)
    base.update(kw)
    return ev.EvalConfig(**base)


def _shards(root: Path, count: int = 3, **kw) -> list[Path]:
    dirs = []
    for i in range(count):
        out = root / f"shard{i}"
        ev.evaluate(_config(out, shard=Shard(i, count), **kw), TASKS, runner=FakeRunner())
        dirs.append(out)
    return dirs


def _edit_run(directory: Path, **changes) -> None:
    path = directory / ev.RUN_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _merge(out: Path, dirs: list[Path], *extra: str) -> int:
    return cli.main(["merge", str(out), *map(str, dirs), "--no-plot", *extra])


def _blocks(summary: dict) -> dict:
    return {"overall": summary["overall"], "per_task": summary["per_task"]}


def test_merged_shards_equal_a_single_run_line_for_line(tmp_path: Path, capsys) -> None:
    single = ev.evaluate(_config(tmp_path / "single"), TASKS, runner=FakeRunner()).summary
    dirs = _shards(tmp_path)
    assert _merge(tmp_path / "merged", dirs[::-1]) == 0  # the order of the directories does not matter
    merged = tmp_path / "merged"
    assert (merged / ev.RESULTS_NAME).read_text() == (tmp_path / "single" / ev.RESULTS_NAME).read_text()
    summary = json.loads((merged / ev.SUMMARY_NAME).read_text())
    assert _blocks(summary) == _blocks(json.loads(json.dumps(single)))
    assert summary["missing_episodes"] == [] and summary["complete"] and summary["shard"] is None
    assert [s["index"] for s in summary["merged"]["shards"]] == [0, 1, 2]
    run = json.loads((merged / ev.RUN_NAME).read_text())
    assert run["merged"]["absent_shards"] == [] and run["policy_content"].startswith("sha256:")
    # readable by the existing tools; rsd eval refuses to write into it
    assert load_run(merged)["overall"]["n"] == 6
    with pytest.raises(ConfigError, match="written by rsd merge"):
        ev.evaluate(_config(merged, resume=True), TASKS, runner=FakeRunner())
    # merging again rewrites OUT to the same bytes (deterministic)
    before = (merged / ev.RESULTS_NAME).read_bytes()
    assert _merge(merged, dirs) == 0 and (merged / ev.RESULTS_NAME).read_bytes() == before
    assert "6 episodes from 3 of 3 shards" in capsys.readouterr().out


def test_gaps_are_listed_and_exit_3_unless_allowed(tmp_path: Path, capsys) -> None:
    dirs = _shards(tmp_path, count=3)
    shutil.rmtree(dirs[2])  # shard 2 never ran: keys at positions 2, 5 = (0,2), (3,2)
    lines = (dirs[1] / ev.RESULTS_NAME).read_text().splitlines()
    (dirs[1] / ev.RESULTS_NAME).write_text(lines[0] + "\n")  # shard 1 cut after its first episode: (3,1) not run
    assert _merge(tmp_path / "m", dirs) == MISSING_EXIT
    err = capsys.readouterr().err
    assert "3 of 6 requested episodes are missing" in err
    assert "libero_spatial task 0 trial 2: shard 2/3 absent" in err
    assert "libero_spatial task 3 trial 1: not run yet by shard 1/3" in err
    summary = json.loads((tmp_path / "m" / ev.SUMMARY_NAME).read_text())
    assert [(m["task_id"], m["trial"]) for m in summary["missing_episodes"]] == [(0, 2), (3, 1), (3, 2)]
    assert summary["overall"]["n"] == 3 and summary["missing"] == 3 and not summary["complete"]
    assert summary["merged"]["absent_shards"] == [2]
    assert _merge(tmp_path / "m", dirs, "--allow-missing") == 0


def test_an_errored_episode_is_kept_counted_and_listed_as_missing(tmp_path: Path) -> None:
    dirs = _shards(tmp_path, count=2)
    bad = ev.EpisodeKey("libero_spatial", 3, 2)  # position 5: shard 1
    shutil.rmtree(dirs[1])
    ev.evaluate(_config(dirs[1], shard=Shard(1, 2)), TASKS, runner=FakeRunner(fail_at=bad))
    summary = merge_runs(tmp_path / "m", dirs, plot=False)
    assert summary["overall"]["errors"] == 1 and summary["overall"]["n"] == 6
    assert [(m["task_id"], m["trial"]) for m in summary["missing_episodes"]] == [(3, 2)]
    assert "RuntimeError: boom" in summary["missing_episodes"][0]["reason"]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("policy_content", "sha256:other", "policy content"),
    ("seed", 8, "seed"),
    ("decode", "greedy", "decoding"),
    ("device", "cuda:0", "device"),
])
def test_shards_of_other_settings_are_refused(tmp_path: Path, key: str, value, message: str) -> None:
    dirs = _shards(tmp_path, count=2)
    _edit_run(dirs[1], **{key: value})
    with pytest.raises(MergeError, match=f"shard 1/2 .* ran other settings than shard 0/2 .*{message}"):
        merge_runs(tmp_path / "m", dirs, plot=False)
    assert not (tmp_path / "m").exists()  # nothing written


def test_shards_of_other_package_versions_are_refused(tmp_path: Path) -> None:
    dirs = _shards(tmp_path, count=2)
    versions = json.loads((dirs[0] / ev.RUN_NAME).read_text())["versions"]
    _edit_run(dirs[1], versions={**versions, "mujoco": "2.0.0"})
    with pytest.raises(MergeError, match="other package versions.*mujoco"):
        merge_runs(tmp_path / "m", dirs, plot=False)
    _edit_run(dirs[1], versions=versions, versions_earlier=[{**versions, "torch": "1.0"}])
    with pytest.raises(MergeError, match="resumed under other package versions"):
        merge_runs(tmp_path / "m", dirs, plot=False)


def test_shards_of_another_request_or_count_are_refused(tmp_path: Path) -> None:
    dirs = _shards(tmp_path / "a", count=2)
    other = tmp_path / "b"
    ev.evaluate(_config(other, shard=Shard(1, 2), trials=2), TASKS, runner=FakeRunner())
    with pytest.raises(MergeError, match="another request"):
        merge_runs(tmp_path / "m", [dirs[0], other], plot=False)
    three = _shards(tmp_path / "c", count=3)
    with pytest.raises(MergeError, match="another request.* in 3 shards vs .* in 2"):
        merge_runs(tmp_path / "m", [dirs[0], three[1]], plot=False)


def test_the_same_shard_twice_and_the_same_episode_twice_are_refused(tmp_path: Path) -> None:
    dirs = _shards(tmp_path, count=2)
    copy = tmp_path / "copy_of_0"
    shutil.copytree(dirs[0], copy)
    with pytest.raises(MergeError, match="shard 0/2 is given twice"):
        merge_runs(tmp_path / "m", [dirs[0], dirs[1], copy], plot=False)
    stray = (dirs[0] / ev.RESULTS_NAME).read_text().splitlines()[0]
    with open(dirs[1] / ev.RESULTS_NAME, "a") as f:
        f.write(stray + "\n")  # shard 0's first episode also recorded in shard 1
    with pytest.raises(MergeError, match="task 0 trial 0 is recorded in two shards"):
        merge_runs(tmp_path / "m", dirs, plot=False)


def test_directories_that_are_not_shards_are_refused(tmp_path: Path) -> None:
    dirs = _shards(tmp_path, count=2)
    whole = tmp_path / "whole"
    ev.evaluate(_config(whole), TASKS, runner=FakeRunner())
    with pytest.raises(MergeError, match="not a shard"):
        merge_runs(tmp_path / "m", [dirs[0], whole], plot=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="holds no run.json"):
        merge_runs(tmp_path / "m", [dirs[0], foreign], plot=False)
    with pytest.raises(MergeError, match="not the output of an earlier rsd merge"):
        merge_runs(foreign, dirs, plot=False)
    with pytest.raises(MergeError, match="also one of the shard directories"):
        merge_runs(dirs[0], dirs, plot=False)
    merge_runs(tmp_path / "m", dirs, plot=False)
    with pytest.raises(MergeError, match="itself a merged run"):
        merge_runs(tmp_path / "m2", [tmp_path / "m"], plot=False)
    with pytest.raises(MergeError, match="none of .* holds a shard run"):
        merge_runs(tmp_path / "m3", [tmp_path / "nothing"], plot=False)

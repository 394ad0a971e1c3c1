"""rsd.eval without LIBERO: the results file, resume, summary math and error handling (the episode loop:
test_episode.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsd import eval as ev
from rsd.errors import ConfigError
from tests._eval_stubs import FakeRunner

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------------- helpers


def _config(tmp_path: Path, **kw) -> ev.EvalConfig:
    base = dict(suite="libero_spatial", policy="expert", out=tmp_path / "eval", trials=4, render=False,
                video="none", progress=False, plot=False)  # summary.png is checked in tests/sim (matplotlib: slow import)
    base.update(kw)
    return ev.EvalConfig(**base)


def _lines(cfg: ev.EvalConfig) -> list[dict]:
    return [json.loads(x) for x in (cfg.out / ev.RESULTS_NAME).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- evaluate


def test_full_run_writes_one_line_per_episode_and_exact_summary(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    outcome = ev.evaluate(cfg, [0, 3], runner=FakeRunner())
    assert outcome.exit_code == 0 and outcome.new_episodes == 8
    lines = _lines(cfg)
    assert [(r["task_id"], r["trial"]) for r in lines] == [(t, i) for t in (0, 3) for i in range(4)]
    # task 0: trials 1, 2 succeed (0, 3 are multiples of 3); task 3: trials 1, 2 succeed
    summary = json.loads((cfg.out / ev.SUMMARY_NAME).read_text())
    assert summary == json.loads(json.dumps(outcome.summary))
    t0 = summary["per_task"]["0"]
    assert (t0["n"], t0["successes"], t0["rate"]) == (4, 2, 0.5)
    assert t0["mean_steps"] == pytest.approx(np.mean([10, 11, 12, 13]))
    assert t0["mean_steps_success"] == pytest.approx(11.5)
    # latency percentiles over every chunk of the task: (1, 2, trial) for trials 0..3
    assert t0["latency_p50_ms"] == pytest.approx(np.percentile([1, 2, 0, 1, 2, 1, 1, 2, 2, 1, 2, 3], 50))
    overall = summary["overall"]
    assert (overall["n"], overall["successes"]) == (8, 4)
    # Wilson 95% for 4/8 = (0.2152, 0.7848) (textbook value)
    assert overall["ci_low"] == pytest.approx(0.2152, abs=1e-4)
    assert overall["ci_high"] == pytest.approx(0.7848, abs=1e-4)
    assert summary["complete"] is True and summary["missing"] == 0
    for key in ("versions", "seed", "renderer", "date", "command", "policy", "wall_s"):
        assert key in summary
    assert summary["versions"]["torch"] and summary["renderer"]["backend"].startswith("none")
    assert not (cfg.out / ev.PLOT_NAME).exists()


def test_wilson_textbook_values() -> None:
    records = [ev.EpisodeResult("libero_spatial", 0, "t", "i", k, k, k < 45, 100, None, None, None, (), 0.0, None, 7)
               for k in range(50)]
    block = ev.summarize(records, [r.key for r in records])["overall"]
    assert (block["successes"], block["n"]) == (45, 50)
    assert (block["ci_low"], block["ci_high"]) == pytest.approx((0.7864, 0.9565), abs=1e-4)
    assert block["latency_p50_ms"] is None  # nothing measured: None, not 0


def test_refuses_to_overwrite_without_resume(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    ev.evaluate(cfg, [0], runner=FakeRunner())
    with pytest.raises(ConfigError, match="--resume"):
        ev.evaluate(cfg, [0], runner=FakeRunner())


def test_resume_runs_only_missing_episodes_and_matches_uninterrupted(tmp_path: Path) -> None:
    full = _config(tmp_path / "a")
    ref = ev.evaluate(full, [0, 1, 2], runner=FakeRunner()).summary

    part = _config(tmp_path / "b", max_episodes=5)
    first = ev.evaluate(part, [0, 1, 2], runner=FakeRunner())
    assert first.new_episodes == 5 and first.summary["missing"] == 7 and not first.summary["complete"]
    runner = FakeRunner()
    resumed = ev.evaluate(_config(tmp_path / "b", resume=True), [0, 1, 2], runner=runner)
    assert len(runner.ran) == 7 and resumed.new_episodes == 7
    lines = _lines(part)
    assert len(lines) == 12 and len({(r["task_id"], r["trial"]) for r in lines}) == 12
    for key in ("overall", "per_task", "missing", "complete"):
        assert resumed.summary[key] == ref[key]  # the fake's latencies are deterministic too
    # resuming a finished eval runs nothing
    again = FakeRunner()
    ev.evaluate(_config(tmp_path / "b", resume=True), [0, 1, 2], runner=again)
    assert again.ran == []


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    ev.evaluate(_config(tmp_path, max_episodes=2), [0], runner=FakeRunner())
    with pytest.raises(ConfigError, match="seed"):
        ev.evaluate(_config(tmp_path, resume=True, seed=8), [0], runner=FakeRunner())


def test_errored_episode_is_recorded_exits_nonzero_and_is_rerun_on_resume(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    bad = ev.EpisodeKey("libero_spatial", 0, 2)
    outcome = ev.evaluate(cfg, [0, 1], runner=FakeRunner(fail_at=bad))
    assert outcome.exit_code == 1
    lines = _lines(cfg)
    assert len(lines) == 3  # the eval stopped at the errored episode
    assert lines[-1]["error"] == "RuntimeError: boom" and lines[-1]["success"] is False
    summary = json.loads((cfg.out / ev.SUMMARY_NAME).read_text())
    assert summary["overall"]["errors"] == 1 and summary["complete"] is False

    runner = FakeRunner()
    resumed = ev.evaluate(_config(tmp_path, resume=True), [0, 1], runner=runner)
    assert runner.ran[0] == bad  # errored episodes are re-run
    assert resumed.exit_code == 0
    assert resumed.summary["overall"]["n"] == 8 and resumed.summary["overall"]["errors"] == 0  # counted once
    assert len(_lines(cfg)) == 9  # the errored line stays as history


def test_torn_last_line_is_dropped_and_rerun(tmp_path: Path) -> None:
    cfg = _config(tmp_path, max_episodes=3)
    ev.evaluate(cfg, [0], runner=FakeRunner())
    path = cfg.out / ev.RESULTS_NAME
    with open(path, "ab") as f:
        f.write(b'{"suite": "libero_spatial", "task_id": 0, "tri')  # a write cut by a kill
    runner = FakeRunner()
    ev.evaluate(_config(tmp_path, resume=True), [0], runner=runner)
    assert [k.trial for k in runner.ran] == [3]
    assert len(_lines(cfg)) == 4


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path, max_episodes=2)
    ev.evaluate(cfg, [0], runner=FakeRunner())
    path = cfg.out / ev.RESULTS_NAME
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(ConfigError, match=":1 is not a valid episode record"):
        ev.evaluate(_config(tmp_path, resume=True), [0], runner=FakeRunner())


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="needs rendered frames"):
        ev.EvalConfig(suite="libero_spatial", policy="x", out=Path("o"), render=False, video="failures")
    with pytest.raises(ConfigError, match="Unknown LIBERO suite"):
        ev.EvalConfig(suite="libero_nope", policy="x", out=Path("o"))
    assert ev.parse_task_ids("0,3,5-7") == (0, 3, 5, 6, 7)
    assert ev.parse_task_ids(None) is None
    with pytest.raises(ConfigError):
        ev.parse_task_ids("a-b")


def test_cli_parses_eval_options() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    args = parser.parse_args(["--policy", "expert", "--out", "x", "--no-render", "--tasks", "0,3", "--workers", "2"])
    assert (args.render, args.tasks, args.workers, args.video, args.trials, args.seed) == (False, "0,3", 2, None, 50, 7)

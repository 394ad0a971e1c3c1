"""``--shard i/N`` and ``--backend``: which episodes a shard runs, what its run.json records, what --resume refuses,
and the command-line refusals (rsd.eval.shards, rsd.eval.evaluation, rsd.eval.cli; no LIBERO)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsd import cli
from rsd import eval as ev
from rsd.errors import ConfigError, ResumeMismatchError
from rsd.eval import evaluation
from rsd.eval.shards import Shard, parse_shard, request_keys, shard_keys
from tests._eval_stubs import FakeRunner

pytestmark = pytest.mark.unit


def _config(out: Path, **kw) -> ev.EvalConfig:
    base = dict(suite="libero_spatial", policy="expert", out=out, trials=3, render=False, video="none",
                progress=False, plot=False)
    base.update(kw)
    return ev.EvalConfig(**base)


# ---------------------------------------------------------------------------------------------------- selection


@settings(max_examples=60, deadline=None)
@given(tasks=st.lists(st.integers(0, 9), min_size=1, max_size=10, unique=True), trials=st.integers(1, 12),
       count=st.integers(1, 15))
def test_shards_are_disjoint_and_cover_every_episode_once(tasks: list[int], trials: int, count: int) -> None:
    keys = request_keys("libero_spatial", tasks, trials)
    slices = [shard_keys(keys, Shard(i, count)) for i in range(count)]
    flat = [k for s in slices for k in s]
    assert sorted(flat) == sorted(keys) and len(set(flat)) == len(keys)  # complete and disjoint
    assert max(map(len, slices)) - min(map(len, slices)) <= 1  # balanced
    for i, part in enumerate(slices):  # round-robin over the canonical order, which each slice keeps
        assert part == [k for p, k in enumerate(keys) if p % count == i]


def test_round_robin_mixes_tasks() -> None:
    keys = request_keys("libero_spatial", [0, 1], 2)  # (0,0) (0,1) (1,0) (1,1)
    assert [(k.task_id, k.trial) for k in shard_keys(keys, Shard(0, 2))] == [(0, 0), (1, 0)]
    assert [(k.task_id, k.trial) for k in shard_keys(keys, Shard(1, 2))] == [(0, 1), (1, 1)]
    assert shard_keys(keys, None) == keys


@pytest.mark.parametrize("text", ["2/2", "-1/2", "0/0", "a/b", "1", "", "1/2/3", "0.5/2"])
def test_bad_shard_text_is_refused_saying_what_to_pass(text: str) -> None:
    with pytest.raises(ConfigError, match="INDEX/COUNT"):
        parse_shard(text)


def test_shard_parses() -> None:
    assert parse_shard(" 3/4 ") == Shard(3, 4) and str(Shard(3, 4)) == "3/4"
    assert Shard.from_record({"index": 1, "count": 2}, "x") == Shard(1, 2)
    with pytest.raises(ConfigError, match="edited"):
        Shard.from_record({"index": 1}, "x")


# ---------------------------------------------------------------------------------------------------- evaluate


def test_a_shard_runs_its_slice_and_records_shard_request_and_versions(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "s1", shard=Shard(1, 2))
    runner = FakeRunner()
    outcome = ev.evaluate(cfg, [0, 2], runner=runner)
    assert [(k.task_id, k.trial) for k in runner.ran] == [(0, 1), (2, 0), (2, 2)]  # positions 1, 3, 5
    run = json.loads((cfg.out / ev.RUN_NAME).read_text())
    assert run["shard"] == {"index": 1, "count": 2} and run["backend"] == "local"
    assert run["request"] == {"suite": "libero_spatial", "tasks": [0, 2], "trials": 3}
    assert set(run["versions"]) >= {"rsd", "torch", "libero", "mujoco", "robosuite"}
    assert outcome.summary["overall"]["requested"] == 3 and outcome.summary["shard"] == run["shard"]


def test_resume_refuses_another_shard_or_request_but_allows_another_backend(tmp_path: Path) -> None:
    out = tmp_path / "s0"
    ev.evaluate(_config(out, shard=Shard(0, 2), max_episodes=1), [0, 1], runner=FakeRunner())
    with pytest.raises(ResumeMismatchError, match=r"shard \(--shard\)"):
        ev.evaluate(_config(out, shard=Shard(1, 2), resume=True), [0, 1], runner=FakeRunner())
    with pytest.raises(ResumeMismatchError, match="request"):
        ev.evaluate(_config(out, shard=Shard(0, 2), resume=True, trials=4), [0, 1], runner=FakeRunner())
    with pytest.raises(ResumeMismatchError, match="shard"):  # nor as the whole run
        ev.evaluate(_config(out, resume=True), [0, 1], runner=FakeRunner())
    runner = FakeRunner()
    ev.evaluate(_config(out, shard=Shard(0, 2), resume=True, backend="ray"), [0, 1], runner=runner)
    assert len(runner.ran) == 2  # 3 keys in shard 0 of 6, one already recorded
    assert json.loads((out / ev.RUN_NAME).read_text())["backend"] == "ray"


def test_unsharded_resume_may_still_extend_trials(tmp_path: Path) -> None:
    ev.evaluate(_config(tmp_path, trials=2), [0], runner=FakeRunner())
    runner = FakeRunner()
    ev.evaluate(_config(tmp_path, trials=3, resume=True), [0], runner=runner)
    assert [k.trial for k in runner.ran] == [2]


def test_resume_under_other_versions_keeps_the_earlier_ones(tmp_path: Path, monkeypatch) -> None:
    ev.evaluate(_config(tmp_path, max_episodes=1), [0], runner=FakeRunner())
    first = json.loads((tmp_path / ev.RUN_NAME).read_text())["versions"]
    monkeypatch.setattr(evaluation, "versions", lambda: {**first, "mujoco": "9.9.9"})
    ev.evaluate(_config(tmp_path, resume=True), [0], runner=FakeRunner())
    run = json.loads((tmp_path / ev.RUN_NAME).read_text())
    assert run["versions"]["mujoco"] == "9.9.9" and run["versions_earlier"] == [first]


def test_config_refuses_address_without_ray_and_unknown_backends(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--address .* --backend ray"):
        _config(tmp_path, address="ray://head:10001")
    with pytest.raises(ConfigError, match="--backend must be one of"):
        _config(tmp_path, backend="mpi")
    with pytest.raises(ConfigError, match="Shard"):
        _config(tmp_path, shard="0/2")


def test_ray_backend_builds_the_ray_runner_lazily(tmp_path: Path, monkeypatch) -> None:
    made: list[tuple] = []

    class RayRunner:
        def __init__(self, settings, policy_factory, workers, *, address, policy_device, policy_server, window_ms):
            made.append((settings, policy_factory, workers, address, policy_device, policy_server, window_ms))
            self.on_ready = None

    monkeypatch.setitem(sys.modules, "rsd.eval.ray_backend", types.SimpleNamespace(RayRunner=RayRunner))
    cfg = _config(tmp_path, backend="ray", address="auto", workers=64)  # more than this box's cores: Ray's to place
    runner = evaluation._default_runner(cfg, dict)
    assert isinstance(runner, RayRunner)
    settings, factory, workers, address, device, server, window = made[0]
    assert (factory, workers, address, device) == (dict, 64, "auto", None)  # the expert runs no network
    assert (server, window) == (False, None)  # every actor its own policy
    assert settings.suite == "libero_spatial" and settings.out == tmp_path


def test_evaluate_of_the_slurm_backend_needs_a_shard(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--shards N"):
        evaluation._default_runner(_config(tmp_path, backend="slurm"), dict)


# ---------------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(("extra", "message"), [
    (["--address", "auto"], "--address auto names a Ray cluster"),
    (["--shards", "2"], "--shards applies to --backend slurm only"),
    (["--slurm-partition", "gpu", "--slurm-opt", "qos=x"], "--slurm-partition, --slurm-opt apply to --backend slurm"),
    (["--backend", "slurm"], "needs --shards N"),
    (["--backend", "slurm", "--shards", "2", "--shard", "0/2"], "drop one of them"),
    (["--backend", "slurm", "--shards", "2", "--slurm-opt", "account"], "KEY=VALUE"),
    (["--backend", "slurm", "--shards", "0"], "--shards must be >= 1"),
    (["--shard", "2/2"], "INDEX/COUNT"),
])
def test_cli_refuses_options_that_do_not_apply(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    code = cli.main(["eval", "--policy", "expert", "--no-render", "--out", str(tmp_path / "o"), *extra])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

"""``rsd eval --backend ray --policy-server`` (``rsd.eval.ray_batched``) on a real local Ray instance, ``FakeEnv`` env
actors and a tiny learned policy, no LIBERO: one policy actor serves every env actor's chunks in batches and the
episodes equal the serial runner's, episode for episode; the env actors import no model code; a row's policy error
reaches only its episode; a killed env actor's episode runs again and is recorded once; a policy that cannot be
batched, or that cannot be made, is refused in the driver.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/integration/test_ray_policy_server.py -q``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the dist extra is not installed: pip install 'rsd[dist]'")

from rsd import eval as ev  # noqa: E402
from rsd.errors import CheckpointNotFoundError, ConfigError  # noqa: E402
from rsd.eval.ray_backend import RayRunner  # noqa: E402
from rsd.eval.records import EpisodeKey  # noqa: E402
from rsd.policy import load_policy  # noqa: E402
from tests._batched_world import (SUITE, DeadOnTask1, TinyEnvWorker,  # noqa: E402
                                  exact_policy_factory, killing_worker, reporting_worker, settings)
from tests._batched_world import TINY_TASKS, TINY_TRIALS, tiny_keys  # noqa: E402
from tests._batched_world import outcome as _outcome  # noqa: E402
from tests._ray_world import Push  # noqa: E402

pytestmark = pytest.mark.integration

TASKS, TRIALS = TINY_TASKS, TINY_TRIALS
_keys = tiny_keys


def _runner(out: Path, factory: Any, worker_factory: Any = TinyEnvWorker, **kw: Any) -> RayRunner:
    runner = RayRunner(settings(out), factory, 2, policy_device="cpu", policy_server=True, **kw)
    runner.worker_factory = worker_factory
    return runner


def test_the_policy_server_batches_and_the_episodes_equal_the_serial_runner(saved: Path, serial, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """On a Ray instance the runner starts itself (2 env actors + the server: 3 CPUs)."""
    assert not ray.is_initialized()
    out, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    # a wide window: a batch waits for both env actors while both are in an episode, however slow this machine
    # both env actors made before either runs an episode (a slow machine may start one long after the other)
    reporting = functools.partial(reporting_worker, report_dir=str(reports), barrier=2)
    runner = _runner(out, exact_policy_factory(saved), reporting, window_ms=500.0)
    config = ev.EvalConfig(suite=SUITE, policy=str(saved), out=out, trials=TRIALS, tasks=TASKS, render=True,
                           video="none", progress=False, plot=False, decode="exact", device="cpu", backend="ray",
                           policy_server=True, batch_window_ms=500.0)
    outcome = ev.evaluate(config, list(TASKS), runner=runner)
    assert outcome.exit_code == 0 and not ray.is_initialized()
    records = {(r.task_id, r.trial): r for r in ev.ResultsFile(out / ev.RESULTS_NAME).load()}
    assert {k: _outcome(r) for k, r in records.items()} == serial

    stats = outcome.summary["batched"]  # every chunk of every episode served once, some two at a time
    assert stats["chunks"] == sum(v[3] for v in serial.values()) and stats["workers"] == 2
    assert "2" in stats["batch_sizes"] and set(stats["batch_sizes"]) <= {"1", "2"} and stats["window_ms"] == 500.0
    assert json.loads((out / ev.SUMMARY_NAME).read_text())["batched"] == stats
    assert "policy server: " in capsys.readouterr().out

    seen = [json.loads(p.read_text()) for p in reports.glob("worker-*.json")]
    assert len(seen) == 2 and all(s == {"model_modules": [], "cuda_initialized": False} for s in seen)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_a_policy_error_reaches_only_its_episode(cluster, saved: Path, serial, tmp_path: Path) -> None:
    keys = [EpisodeKey(SUITE, 0, 0), EpisodeKey(SUITE, 0, 1), EpisodeKey(SUITE, 1, 0)]
    got = {(r.task_id, r.trial): r for r in _runner(tmp_path, DeadOnTask1(str(saved))).results(keys)}
    assert "DeadHiddenStateError" in got[1, 0].error and "'push 1'" in got[1, 0].error
    assert "policy server of rsd eval --backend ray --policy-server" in got[1, 0].traceback
    assert {k: _outcome(r) for k, r in got.items() if k[0] == 0} == {k: serial[k] for k in ((0, 0), (0, 1))}


def test_a_killed_env_actor_s_episode_runs_again_and_is_recorded_once(cluster, saved: Path, serial, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "killed"
    killing = functools.partial(killing_worker, target=(1, 1), marker=str(marker))
    runner = _runner(tmp_path, exact_policy_factory(saved), killing)
    results = list(runner.results(_keys()))
    assert marker.exists() and runner.restarts == 1
    assert len({(r.task_id, r.trial) for r in results}) == len(results) == len(_keys())
    assert {(r.task_id, r.trial): _outcome(r) for r in results} == serial
    assert "while running task 1 trial 1" in capsys.readouterr().err
    assert runner.server_stats()["worker_restarts"] == 1


def test_a_policy_that_cannot_be_batched_is_refused_in_the_driver(cluster, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Push has no predict_chunks / reset_slot"):
        list(_runner(tmp_path, Push).results(_keys()))
    with pytest.raises(CheckpointNotFoundError):
        list(_runner(tmp_path, functools.partial(load_policy, tmp_path / "missing")).results(_keys()))


def test_the_options_that_go_with_it(tmp_path: Path) -> None:
    base = dict(suite=SUITE, policy="lowdim", out=tmp_path / "o", trials=1, video="none", progress=False, plot=False)
    with pytest.raises(ConfigError, match="--policy-server .* applies to --backend ray only"):
        ev.EvalConfig(**base, policy_server=True)
    with pytest.raises(ConfigError, match="--policy expert runs one episode at a time"):
        ev.EvalConfig(**{**base, "policy": "expert"}, backend="ray", policy_server=True)
    with pytest.raises(ConfigError, match="--batch-window-ms 5.0 is the policy server's wait"):
        ev.EvalConfig(**base, backend="ray", batch_window_ms=5.0)  # no server to wait
    assert ev.EvalConfig(**base, backend="ray", policy_server=True, batch_window_ms=5.0).policy_server

"""``rsd eval --backend batched`` (``rsd.eval.batched.BatchedRunner``) on ``FakeEnv`` with a tiny learned policy, no
LIBERO: spawned env workers and the policy server in this process give the serial runner's episodes, episode for
episode; the env workers import no model code and never initialise CUDA; a policy error reaches only its episode;
a worker killed in the middle of an episode is replaced and the episode recorded once; padded batches (``pad``)
have one row per worker, each worker at its own row.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

from rsd import eval as ev
from rsd.eval.batched import BatchedRunner
from rsd.eval.records import EpisodeKey
from tests._batched_world import (SUITE, DeadOnTask1, TinyEnvWorker, exact_policy_factory, killing_worker,
                                  reporting_worker, settings)
from tests._batched_world import TINY_TASKS, TINY_TRIALS, tiny_keys
from tests._batched_world import outcome as _outcome

pytestmark = pytest.mark.integration

TASKS, TRIALS = TINY_TASKS, TINY_TRIALS
_keys = tiny_keys


def test_batched_eval_equals_the_serial_runner(saved: Path, serial, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    runner = BatchedRunner(settings(out), exact_policy_factory(saved), 2)
    runner.worker_factory = functools.partial(reporting_worker, report_dir=str(reports))
    config = ev.EvalConfig(suite=SUITE, policy=str(saved), out=out, trials=TRIALS, tasks=TASKS, render=True,
                           video="none", progress=False, plot=False, decode="exact", device="cpu", backend="batched")
    outcome = ev.evaluate(config, list(TASKS), runner=runner)
    assert outcome.exit_code == 0
    records = {(r.task_id, r.trial): r for r in ev.ResultsFile(out / ev.RESULTS_NAME).load()}
    assert {k: _outcome(r) for k, r in records.items()} == serial
    assert all(r.speculative.greedy_mismatched == 0 for r in records.values())

    stats = outcome.summary["batched"]  # the policy server's batches: every chunk of every episode, once
    assert stats["chunks"] == sum(v[3] for v in serial.values()) and stats["workers"] == 2
    assert set(stats["batch_sizes"]) <= {"1", "2"} and stats["worker_restarts"] == 0
    assert json.loads((out / ev.SUMMARY_NAME).read_text())["batched"] == stats
    assert json.loads((out / ev.RUN_NAME).read_text())["backend"] == "batched"
    assert "policy server: " in capsys.readouterr().out

    seen = [json.loads(p.read_text()) for p in reports.glob("worker-*.json")]
    assert len(seen) == 2 and all(s == {"model_modules": [], "cuda_initialized": False} for s in seen)


def test_a_policy_error_reaches_only_its_episode(saved: Path, serial, tmp_path: Path) -> None:
    keys = [EpisodeKey(SUITE, 0, 0), EpisodeKey(SUITE, 0, 1), EpisodeKey(SUITE, 1, 0)]
    runner = BatchedRunner(settings(tmp_path), DeadOnTask1(str(saved)), 2)
    runner.worker_factory = TinyEnvWorker
    got = {(r.task_id, r.trial): r for r in runner.results(keys)}
    assert "DeadHiddenStateError" in got[1, 0].error and "'push 1'" in got[1, 0].error
    assert "policy server" in got[1, 0].traceback
    assert {k: _outcome(r) for k, r in got.items() if k[0] == 0} == {k: serial[k] for k in ((0, 0), (0, 1))}


def test_a_killed_worker_s_episode_runs_again_and_is_recorded_once(saved: Path, serial, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "killed"
    runner = BatchedRunner(settings(tmp_path), exact_policy_factory(saved), 2)
    runner.worker_factory = functools.partial(killing_worker, target=(1, 1), marker=str(marker))
    results = list(runner.results(_keys()))
    assert marker.exists() and runner.restarts == 1
    assert len(results) == len(_keys()) and len({(r.task_id, r.trial) for r in results}) == len(results)
    assert {(r.task_id, r.trial): _outcome(r) for r in results} == serial
    assert "while running task 1 trial 1 (exit code -9); re-running it on a fresh worker" in capsys.readouterr().err
    assert runner.server_stats()["worker_restarts"] == 1


class _Recorder:
    """The policy, with the slots of every ``predict_chunks`` call recorded (the server calls it in this process)."""

    def __init__(self, policy: Any) -> None:
        self.policy, self.calls = policy, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def predict_chunks(self, observations: Any, instructions: Any, slots: Any) -> Any:
        self.calls.append(list(slots))
        return self.policy.predict_chunks(observations, instructions, slots)


def test_padded_batches_have_one_row_per_worker_each_at_its_own_row(saved: Path, serial, tmp_path: Path) -> None:
    made: list[_Recorder] = []

    def factory() -> _Recorder:
        made.append(_Recorder(exact_policy_factory(saved)()))
        return made[-1]

    out = tmp_path / "run"
    runner = BatchedRunner(settings(out), factory, 3, pad=True)
    runner.worker_factory = TinyEnvWorker
    config = ev.EvalConfig(suite=SUITE, policy=str(saved), out=out, trials=TRIALS, tasks=TASKS, render=True,
                           video="none", progress=False, plot=False, decode="exact", device="cpu", backend="batched",
                           batch_pad=True)
    outcome = ev.evaluate(config, list(TASKS), runner=runner)
    assert outcome.exit_code == 0
    records = {(r.task_id, r.trial): r for r in ev.ResultsFile(out / ev.RESULTS_NAME).load()}
    assert {k: _outcome(r) for k, r in records.items()} == serial  # the fillers' chunks reach no episode

    calls = made[0].calls
    assert calls and all(len(slots) == 3 for slots in calls)  # always one row per worker
    rows_of: dict[int, set[int]] = {}
    for slots in calls:
        for row, slot in enumerate(slots):
            if slot >= 0:
                rows_of.setdefault(slot, set()).add(row)
            else:
                assert slot == -1 - row  # a filler row under a slot of its own
    assert len(rows_of) == 3 and all(len(rows) == 1 for rows in rows_of.values())  # a worker keeps its row
    assert sorted(next(iter(r)) for r in rows_of.values()) == [0, 1, 2]
    assert any(min(slots) < 0 for slots in calls)  # some batches were padded
    stats = outcome.summary["batched"]
    assert stats["padded_to"] == 3 and stats["chunks"] == sum(v[3] for v in serial.values())

"""Stand-ins for `rsd.eval`'s episode runner, for tests of what `evaluate` records and builds (no LIBERO)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from rsd import eval as ev
from rsd.eval import evaluation


class Succeeds:
    """Records every requested episode as a success at once (a one-step episode); ``ran`` lists the keys."""

    def __init__(self) -> None:
        self.ran: list[ev.EpisodeKey] = []

    def results(self, keys: Sequence[ev.EpisodeKey]) -> Iterator[ev.EpisodeResult]:
        for key in keys:
            self.ran.append(key)
            yield ev.EpisodeResult(suite=key.suite, task_id=key.task_id, task_name="t", instruction="i",
                                   trial=key.trial, init_state_index=key.trial, success=True, steps=1, error=None,
                                   latency_p50_ms=None, latency_p90_ms=None, chunk_latencies_ms=(), wall_s=0.0,
                                   video=None, seed=7)


def fake_outcome(key: ev.EpisodeKey) -> bool:
    return (key.task_id + key.trial) % 3 != 0


class FakeRunner:
    """Deterministic results from the key (success, steps, latencies); ``fail_at`` gives that episode an error
    result and ends, as a real runner does; ``ran`` lists what it ran."""

    def __init__(self, fail_at: ev.EpisodeKey | None = None) -> None:
        self.fail_at = fail_at
        self.ran: list[ev.EpisodeKey] = []

    def results(self, keys: Sequence[ev.EpisodeKey]) -> Iterator[ev.EpisodeResult]:
        for key in keys:
            self.ran.append(key)
            err = "RuntimeError: boom" if key == self.fail_at else None
            yield ev.EpisodeResult(
                suite=key.suite, task_id=key.task_id, task_name=f"task_{key.task_id}", instruction="do it",
                trial=key.trial, init_state_index=key.trial, success=fake_outcome(key) and err is None,
                steps=10 + key.trial, error=err, latency_p50_ms=1.0, latency_p90_ms=2.0,
                chunk_latencies_ms=(1.0, 2.0, float(key.trial)), wall_s=0.1, video=None, seed=7,
                traceback="Traceback ..." if err else None)
            if err:
                return


class NoEpisodes:
    """A runner with nothing to run: `evaluate` writes its records and summary from zero episodes."""

    def results(self, keys: Sequence[ev.EpisodeKey]) -> Iterator[ev.EpisodeResult]:
        return iter(())


def capture_policy_factories(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[], Any]]:
    """Make `evaluate`'s default runner a `NoEpisodes` and return the list each call's policy factory lands in."""
    factories: list[Callable[[], Any]] = []

    def runner(config: ev.EvalConfig, policy_factory: Callable[[], Any]) -> NoEpisodes:
        factories.append(policy_factory)
        return NoEpisodes()

    monkeypatch.setattr(evaluation, "_default_runner", runner)
    return factories

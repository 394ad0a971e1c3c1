"""Stand-ins for `rsd.eval`'s episode runner, for tests of what `evaluate` records and builds (no LIBERO)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from rsd import eval as ev


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

    monkeypatch.setattr(ev, "_default_runner", runner)
    return factories

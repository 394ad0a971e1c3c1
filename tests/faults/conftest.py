"""Fixtures of the fault suite."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture()
def no_libero(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command whose input must be refused before LIBERO is used: reaching LIBERO fails the test at once."""
    import rsd.sim.libero as libero

    def reached(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("LIBERO was reached: the input was not refused first")

    monkeypatch.setattr(libero, "list_tasks", reached)

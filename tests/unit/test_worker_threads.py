"""Torch threads per eval worker: the user's OMP_NUM_THREADS wins (several evals sharing a host), else the host's
cores are shared among the workers."""

from __future__ import annotations

import os

import pytest

from rsd.errors import ConfigError
from rsd.eval.runners import worker_threads

pytestmark = pytest.mark.unit


def test_omp_num_threads_is_respected(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert worker_threads(6) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads(2) == 3


def test_without_it_the_cores_are_shared(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert worker_threads(6) == 5 and worker_threads(64) == 1


@pytest.mark.parametrize("bad", ["x", "0", "-2"])
def test_a_bad_value_is_refused(monkeypatch, bad):
    monkeypatch.setenv("OMP_NUM_THREADS", bad)
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS"):
        worker_threads(2)

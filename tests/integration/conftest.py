"""Fixtures shared by the policy-server tests (``--backend batched`` and ``--backend ray --policy-server``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._batched_world import TinyEnvWorker, exact_policy_factory, outcome, saved_tiny_policy, settings, tiny_keys


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny speculative RSD policy, saved."""
    return saved_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny_rsd")


@pytest.fixture(scope="module")
def serial(saved: Path, tmp_path_factory) -> dict[tuple[int, int], tuple]:
    """The outcomes of ``tiny_keys()`` run one after the other in this process: what a policy server must give."""
    worker = TinyEnvWorker(settings(tmp_path_factory.mktemp("serial")), exact_policy_factory(saved)())
    return {(k.task_id, k.trial): outcome(worker.run(k)) for k in tiny_keys()}

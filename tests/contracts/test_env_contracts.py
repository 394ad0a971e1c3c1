"""The env contract (env_contract.py) on every env the episode loop runs: the tests' FakeEnv (unrendered and
rendered) and real LIBERO (unrendered, libero_spatial task 0; `sim`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from rsd.observation import ObservationSpec
from tests._fake_env import FakeEnv
from tests.contracts.env_contract import EnvContract


class TestFakeEnv(EnvContract):
    spec = ObservationSpec(images=(), image_size=32, raw=True)

    @pytest.fixture(scope="class")
    @classmethod
    def env(cls) -> FakeEnv:
        return FakeEnv()


class TestRenderedFakeEnv(EnvContract):
    spec = ObservationSpec(image_size=32, raw=True)

    @pytest.fixture(scope="class")
    @classmethod
    def env(cls) -> FakeEnv:
        return FakeEnv(render=True, image_size=32)


@pytest.mark.sim
class TestLiberoEnv(EnvContract):
    spec = ObservationSpec(images=(), raw=True, objects=True)

    @pytest.fixture(scope="class")
    @classmethod
    def env(cls) -> Iterator[Any]:
        from rsd.sim import libero

        with libero.make_env("libero_spatial", 0, render=False) as env:
            yield env

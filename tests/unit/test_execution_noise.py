"""DART-style demonstrations (`rsd collect --action-noise`): the env runs perturbed actions, the demo keeps the
expert's own ones as labels, one label per executed step, in order, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from rsd.errors import ConfigError
from rsd.policy.protocol import ActionChunk
from rsd.sim.collect import ExecutionNoise

pytestmark = pytest.mark.unit


class _Counting:
    """A policy whose chunk rows are distinct and known: row j of call i is (i*10 + j) / 100 in every dim."""

    def __init__(self, rows: int) -> None:
        self.rows, self.calls = rows, 0

    def reset(self) -> None:
        self.calls = 0

    def predict_chunk(self, observation, instruction) -> ActionChunk:
        values = (self.calls * 10 + np.arange(self.rows)) / 100.0
        self.calls += 1
        return ActionChunk(actions=np.repeat(values[:, None], 7, axis=1).astype(np.float32), info={})


@pytest.mark.parametrize("rows", [1, 4])
def test_labels_are_the_clean_actions_in_execution_order(rows: int) -> None:
    noise = ExecutionNoise(_Counting(rows), sigma=0.2)
    noise.begin(7, 0, 1000)
    executed, labels = [], []
    for _ in range(3):
        chunk = noise.predict_chunk({}, "task")
        for row in chunk.actions:
            executed.append(row)
            labels.append(noise.label_for_step())
    executed, labels = np.array(executed), np.array(labels)
    expected = np.array([(i * 10 + j) / 100.0 for i in range(3) for j in range(rows)])
    np.testing.assert_allclose(labels[:, 0], expected, atol=1e-6)
    assert np.abs(executed[:, :3] - labels[:, :3]).min() > 0  # translation perturbed at every step
    np.testing.assert_array_equal(executed[:, 3:], labels[:, 3:].astype(np.float32))  # rotation, gripper untouched
    assert np.all(np.abs(executed) <= 1.0)


def test_noise_is_seeded_per_episode_and_correlated_in_time() -> None:
    class _Still(_Counting):  # always the zero action: the executed action is the noise itself
        def predict_chunk(self, observation, instruction) -> ActionChunk:
            return ActionChunk(actions=np.zeros((1, 7), np.float32), info={})

    def run(seed: int) -> np.ndarray:
        noise = ExecutionNoise(_Still(1), sigma=0.1)
        noise.begin(7, 3, seed)
        out = []
        for _ in range(400):
            out.append(noise.predict_chunk({}, "t").actions[0, :3] - noise.label_for_step()[:3])
        return np.array(out)

    a, b, c = run(1000), run(1000), run(1001)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    lag1 = np.corrcoef(a[1:, 0], a[:-1, 0])[0, 1]
    assert 0.75 < lag1 < 0.98  # AR(1) with rho 0.9
    assert 0.05 < a[50:].std() < 0.15  # stationary std ~ sigma


@pytest.mark.parametrize("sigma", [0.0, -0.1, 1.5, "0.1"])
def test_bad_noise_is_refused(sigma) -> None:
    with pytest.raises(ConfigError, match="action-noise"):
        ExecutionNoise(_Counting(1), sigma=sigma)

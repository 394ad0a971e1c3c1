"""BOUNDS_Q99 normalization, gripper conventions and unnorm-key resolution (OpenVLA-OFT's BOUNDS_Q99)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rsd.errors import CheckpointNotFoundError, NonFiniteError, ShapeError, UnknownUnnormKeyError
from rsd.normalize import (ENV_GRIPPER, MODEL_GRIPPER, BoundsQ99Normalizer, NormStats, load_dataset_statistics,
                           model_to_env_gripper, resolve_unnorm_key)

pytestmark = pytest.mark.unit

STATS = NormStats(q01=[-0.9, -0.8, -0.95, -0.1, -0.2, -0.3, 0.0], q99=[0.9, 0.85, 0.95, 0.12, 0.2, 0.33, 1.0],
                  mask=[True] * 6 + [False])


def test_formula_by_hand():
    norm = BoundsQ99Normalizer(STATS)
    x = np.array([0.0, 0.85, -2.0, 0.01, 0.0, 0.0, 1.0])
    expected0 = 2 * (0.0 + 0.9) / (1.8 + 1e-8) - 1
    out = norm.normalize(x)
    assert out[0] == pytest.approx(expected0, abs=1e-6)
    assert out[1] == pytest.approx(1.0, abs=1e-6)  # q99 -> 1
    assert out[2] == -1.0  # clipped
    assert out[6] == 1.0  # masked gripper passes through untouched


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float64, (5, 7), elements=st.floats(-1, 1)))
def test_unnormalize_inverts_normalize_inside_bounds(x_norm):
    norm = BoundsQ99Normalizer(STATS)
    raw = norm.unnormalize(x_norm)
    np.testing.assert_allclose(norm.normalize(raw), x_norm, atol=1e-5)


def test_gripper_conventions():
    assert MODEL_GRIPPER.open_value == 1.0 and MODEL_GRIPPER.close_value == 0.0
    assert ENV_GRIPPER.open_value == -1.0 and ENV_GRIPPER.close_value == 1.0
    out = model_to_env_gripper(np.array([1.0, 0.0, 0.9, 0.1]))
    np.testing.assert_array_equal(out, [-1.0, 1.0, -1.0, 1.0])  # model open (1) -> env open (-1)
    assert model_to_env_gripper(np.array([MODEL_GRIPPER.open_value]))[0] == ENV_GRIPPER.open_value
    assert model_to_env_gripper(np.array([MODEL_GRIPPER.close_value]))[0] == ENV_GRIPPER.close_value
    with pytest.raises(NonFiniteError):
        model_to_env_gripper(np.array([np.nan]))


def test_unnorm_key_resolution():
    assert resolve_unnorm_key({"libero_spatial": {}}, "libero_spatial") == "libero_spatial"
    assert resolve_unnorm_key({"libero_spatial_no_noops": {}}, "libero_spatial") == "libero_spatial_no_noops"
    with pytest.raises(UnknownUnnormKeyError) as err:
        resolve_unnorm_key({"libero_spatial_no_noops": {}, "bridge_orig": {}}, "libero_object")
    msg = str(err.value)
    assert "bridge_orig" in msg and "libero_spatial_no_noops" in msg and "libero_object_no_noops" in msg


def test_errors_and_file_loading(tmp_path):
    norm = BoundsQ99Normalizer(STATS)
    with pytest.raises(ShapeError, match="7"):
        norm.normalize(np.zeros(6))
    with pytest.raises(NonFiniteError):
        norm.unnormalize(np.full(7, np.inf))
    with pytest.raises(CheckpointNotFoundError):
        load_dataset_statistics(tmp_path / "missing.json")
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps({"libero_spatial_no_noops": {"action": STATS.to_dict(), "proprio": STATS.to_dict()}}))
    stats = load_dataset_statistics(path)
    key = resolve_unnorm_key(stats, "libero_spatial")
    np.testing.assert_array_equal(stats[key]["action"].q99, STATS.q99)
    np.testing.assert_array_equal(stats[key]["action"].mask, STATS.mask)


def test_stats_from_data():
    x = np.linspace(-1, 1, 707).reshape(101, 7)
    s = NormStats.from_data(x)
    assert s.dim == 7 and s.mask.all()
    assert np.all(s.q01 < s.q99)

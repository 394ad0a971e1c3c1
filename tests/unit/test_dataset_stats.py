"""Normalization statistics of demos in OpenVLA's dataset_statistics.json shape, and the fresh-scene helpers of
``rsd collect`` (no LIBERO)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsd.action_space import ActionSpace
from rsd.dataset_stats import (dataset_statistics, demo_proprio, noop_mask, statistics_key, statistics_path,
                               write_dataset_statistics)
from rsd.errors import ConfigError, ShapeError
from rsd.normalize import load_dataset_statistics, resolve_unnorm_key
from rsd.sim.collect import SCENE_MATCH_TOL, benchmark_match
from rsd.sim.protocol import object_names
from rsd.sim.demos import Demo, DemoWriter, read_demos

pytestmark = pytest.mark.unit

h5py = pytest.importorskip("h5py", reason="h5py is required (install rsd[sim])")

SUITE = "libero_spatial"
QUANTITIES = ("mean", "std", "max", "min", "q01", "q99", "mask")


def _episode(T: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    actions = np.concatenate([rng.uniform(-1, 1, size=(T, 6)), np.where(rng.random((T, 1)) < 0.5, -1.0, 1.0)], 1)
    obs = {"ee_pos": rng.normal(size=(T, 3)), "ee_ori": rng.normal(size=(T, 3)),
           "gripper_states": rng.normal(size=(T, 2)), "joint_states": rng.normal(size=(T, 7)),
           "bowl_1_pos": rng.normal(size=(T, 3)), "bowl_1_quat": rng.normal(size=(T, 4))}
    return dict(actions=actions, obs=obs, states=rng.normal(size=(T, 5)), robot_states=rng.normal(size=(T, 9)))


def _demo(T: int, seed: int) -> Demo:
    ep = _episode(T, seed)
    return Demo(f"demo_{seed}", ep["actions"], "x", obs=ep["obs"])


def test_openvla_shape_key_and_gripper_convention() -> None:
    demos = [_demo(40, 0), _demo(25, 1)]
    stats = dataset_statistics(demos, SUITE)
    assert list(stats) == [statistics_key(SUITE)] == ["libero_spatial_no_noops"]
    entry = stats["libero_spatial_no_noops"]
    assert entry["num_transitions"] == 65 and entry["num_trajectories"] == 2 and entry["num_noops_skipped"] == 0
    for name, dim in (("action", 7), ("proprio", 8)):
        assert sorted(entry[name]) == sorted(QUANTITIES)
        assert all(len(entry[name][q]) == dim for q in QUANTITIES), name
    assert entry["action"]["mask"] == [True] * 6 + [False]  # the gripper is not normalized
    assert entry["proprio"]["mask"] == [True] * 8
    assert entry["action"]["min"][6] == 0.0 and entry["action"]["max"][6] == 1.0  # model convention: 1 open
    actions = np.concatenate([d.actions for d in demos])
    np.testing.assert_allclose(entry["action"]["q99"][:6], np.quantile(actions[:, :6], 0.99, axis=0))
    np.testing.assert_allclose(entry["action"]["mean"][6], np.mean(actions[:, 6] < 0))  # share of open steps
    proprio = np.concatenate([demo_proprio(d.obs) for d in demos])  # [65, 8]
    np.testing.assert_array_equal(proprio[:, 3:6], np.concatenate([d.obs["ee_ori"] for d in demos]))
    np.testing.assert_allclose(entry["proprio"]["std"], proprio.std(0))


def test_loads_through_the_one_unnormalization_path_and_matches_the_action_space(tmp_path: Path) -> None:
    """What rsd.normalize reads from the file is what ActionSpace.fit computes from the same actions."""
    demos = [_demo(60, 3), _demo(30, 4)]
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps(dataset_statistics(demos, SUITE)))
    loaded = load_dataset_statistics(path)
    key = resolve_unnorm_key(loaded, SUITE)
    assert key == "libero_spatial_no_noops"
    space = ActionSpace(loaded[key]["action"])  # refuses a normalized gripper
    fitted = ActionSpace.fit(np.concatenate([d.actions for d in demos]))
    for name in ("q01", "q99", "mean", "std"):
        np.testing.assert_allclose(getattr(space.stats, name), getattr(fitted.stats, name), rtol=1e-12)
    np.testing.assert_array_equal(space.stats.mask, fitted.stats.mask)
    assert loaded[key]["proprio"].dim == 8


def test_noops_are_left_out_and_counted() -> None:
    actions = np.zeros((6, 7))
    actions[:, 6] = [-1, -1, 1, 1, 1, -1]
    actions[3, 0] = 0.5
    assert noop_mask(actions).tolist() == [False, True, False, False, True, False]
    ep = _episode(6, 5)
    entry = dataset_statistics([Demo("d", actions, "x", obs=ep["obs"])], SUITE)["libero_spatial_no_noops"]
    assert entry["num_transitions"] == 4 and entry["num_noops_skipped"] == 2
    with pytest.raises(ShapeError):
        noop_mask(np.zeros((4, 6)))


def test_missing_proprio_is_named() -> None:
    ep = _episode(5, 0)
    del ep["obs"]["ee_ori"]
    with pytest.raises(ConfigError, match="ee_ori"):
        dataset_statistics([Demo("demo_7", ep["actions"], "x", obs=ep["obs"])], SUITE)
    with pytest.raises(ConfigError, match="no demo"):
        dataset_statistics([], SUITE)


def test_written_next_to_the_demo_file(tmp_path: Path) -> None:
    path = tmp_path / "spatial.hdf5"
    with DemoWriter(path) as writer:
        for seed in (0, 1):
            writer.add(**_episode(12, seed), problem_info={"language_instruction": "x"})
    out = write_dataset_statistics(path, SUITE)
    assert out == statistics_path(path) == tmp_path / "spatial_dataset_statistics.json"
    assert not out.with_name(out.name + ".partial").exists()
    assert json.loads(out.read_text()) == json.loads(json.dumps(dataset_statistics(read_demos(path), SUITE)))


def test_object_names_are_the_posed_objects() -> None:
    raw = {"robot0_eef_pos": 0, "robot0_eef_quat": 0, "plate_1_pos": 0, "plate_1_quat": 0,
           "plate_1_to_robot0_eef_pos": 0, "plate_1_to_robot0_eef_quat": 0, "akita_black_bowl_1_pos": 0,
           "akita_black_bowl_1_quat": 0, "flat_stove_1_burner_pos": 0, "object-state": 0}
    assert object_names(raw) == ["akita_black_bowl_1", "plate_1"]


def test_benchmark_match_finds_a_benchmark_scene() -> None:
    rng = np.random.default_rng(0)
    init_states = rng.normal(size=(50, 92))
    assert benchmark_match(init_states[17] + SCENE_MATCH_TOL / 2, init_states) == 17
    fresh = init_states[17].copy()
    fresh[40] += 0.01  # one object 1 cm away: another scene
    assert benchmark_match(fresh, init_states) is None

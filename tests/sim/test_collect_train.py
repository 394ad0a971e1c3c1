"""``rsd collect`` -> replayable LIBERO-layout demos from fresh scenes, with their statistics -> ``rsd
train-tokenizer`` -> ``expert-rfsq:DIR``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_collect_train.py -q`` (about 1 min on an
idle 2-core machine: 2 recorded + 1 replayed unrendered episodes, a 300-step tokenizer fit).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.sim

if importlib.util.find_spec("libero") is None:
    pytest.skip("LIBERO is not installed: run `bash scripts/setup.sh`", allow_module_level=True)

import h5py  # noqa: E402

from tests._rsd_cli import run_rsd  # noqa: E402

from rsd.dataset_stats import statistics_path  # noqa: E402
from rsd.normalize import load_dataset_statistics, resolve_unnorm_key  # noqa: E402
from rsd.sim import protocol  # noqa: E402
from rsd.sim.collect import SCENE_MATCH_TOL, SCENE_SEED_START  # noqa: E402
from rsd.sim.demos import action_chunks, read_demos  # noqa: E402
from tests._expert_world import tiled  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUITE = "libero_spatial"


def _rsd(*args: str) -> subprocess.CompletedProcess:
    return run_rsd(*args, timeout=600)


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demos") / "spatial.hdf5"
    res = _rsd("collect", "--suite", SUITE, "--tasks", "0", "--episodes-per-task", "2", "--out", str(path),
               "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    return path


def test_collected_file_has_libero_layout(demo_file: Path) -> None:
    with h5py.File(demo_file) as f:
        data = f["data"]
        info = json.loads(data.attrs["problem_info"])
        assert info["language_instruction"].startswith("pick up the black bowl between the plate")
        assert data.attrs["num_demos"] == 2 and data.attrs["macros_image_convention"] in ("opengl", "opencv")
        assert data.attrs["rsd_scenes"] == "fresh" and data.attrs["rsd_policy"] == "expert"
        demo = data["demo_0"]
        T = demo["actions"].shape[0]
        assert demo["actions"].shape == (T, 7) and demo.attrs["num_samples"] == T
        for key, width in (("ee_pos", 3), ("ee_ori", 3), ("ee_states", 6), ("gripper_states", 2), ("joint_states", 7)):
            assert demo["obs"][key].shape == (T, width), key
        objects = json.loads(demo.attrs["rsd_objects"])
        assert {"akita_black_bowl_1", "akita_black_bowl_2", "plate_1"} <= set(objects)
        for name in objects:  # every object's pose at every step
            assert demo["obs"][f"{name}_pos"].shape == (T, 3) and demo["obs"][f"{name}_quat"].shape == (T, 4), name
        assert demo["states"].shape[0] == T and demo["robot_states"].shape == (T, 9)
        np.testing.assert_array_equal(demo.attrs["init_state"], demo["states"][0])
        assert demo.attrs["rsd_scene_init_state"].shape == demo["states"].shape[1:]
        assert "agentview_rgb" not in demo["obs"]  # unrendered recording
    demos = read_demos(demo_file)
    assert [d.attrs["rsd_scene_seed"] for d in demos] == [SCENE_SEED_START, SCENE_SEED_START + 1]
    assert action_chunks(demos, 8).shape == (sum(d.num_steps - 7 for d in demos), 8, 7)


def test_demonstration_chunks_are_never_tiled(demo_file: Path) -> None:
    """The expert decided every step: no 8-step window of a recorded demo repeats one action."""
    chunks = action_chunks(read_demos(demo_file), 8)  # [N, 8, 7]
    assert [i for i, c in enumerate(chunks) if tiled(c)] == []
    moved = np.abs(chunks[:, :, :3] - chunks[:, :1, :3]).max(axis=(1, 2))  # [N] largest change from row 0
    assert np.median(moved) > 0.01, np.round(np.quantile(moved, [0.1, 0.5, 0.9]), 4)


def test_scenes_are_fresh_not_benchmark_init_states(demo_file: Path) -> None:
    """Each demo's scene is none of the task's 50 benchmark init states, and its seed rebuilds it exactly."""
    from rsd.sim.libero import load_init_states, make_env

    benchmark = load_init_states(SUITE, 0)  # [50, S]
    demos = read_demos(demo_file)
    with h5py.File(demo_file) as f:
        scenes = [f["data"][d.name].attrs["rsd_scene_init_state"] for d in demos]
    for scene in scenes:
        assert np.max(np.abs(benchmark - scene[None, :]), axis=1).min() > SCENE_MATCH_TOL
    assert np.max(np.abs(scenes[0] - scenes[1])) > SCENE_MATCH_TOL  # two seeds, two scenes
    with make_env(SUITE, 0, render=False) as env:
        env.reset(3)  # whatever ran before
        env.reset_scene(int(demos[1].attrs["rsd_scene_seed"]))
        np.testing.assert_array_equal(env.scene_state, scenes[1])


def test_statistics_are_written_beside_and_load(demo_file: Path) -> None:
    stats = load_dataset_statistics(statistics_path(demo_file))
    key = resolve_unnorm_key(stats, SUITE)
    assert key == f"{SUITE}_no_noops"
    assert stats[key]["action"].mask.tolist() == [True] * 6 + [False] and stats[key]["proprio"].dim == 8
    raw = json.loads(statistics_path(demo_file).read_text())[key]
    demos = read_demos(demo_file)
    assert raw["num_trajectories"] == 2
    assert raw["num_transitions"] + raw["num_noops_skipped"] == sum(d.num_steps for d in demos)


def test_recorded_actions_replay_to_success(demo_file: Path) -> None:
    """The file is faithful: from the same scene, the recorded actions reproduce the states and the success."""
    from rsd.sim.libero import make_env

    demo = read_demos(demo_file)[0]
    with make_env(SUITE, 0, render=False) as env:
        env.reset_scene(int(demo.attrs["rsd_scene_seed"]))
        for _ in range(protocol.NUM_STEPS_WAIT):
            env.step(protocol.dummy_action())
        np.testing.assert_allclose(env.raw_env.get_sim_state(), demo.states[0], atol=1e-9)
        dones = []
        for t, action in enumerate(demo.actions):
            if t in (1, demo.num_steps // 2):
                np.testing.assert_allclose(env.raw_env.get_sim_state(), demo.states[t], atol=1e-6)
            dones.append(env.step(action)[1])
    assert dones[-1] and not any(dones[:-1])


def test_train_tokenizer_cli(demo_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    res = _rsd("train-tokenizer", "--demos", str(demo_file), "--out", str(out), "--steps", "300",
               "--val-fraction", "0.5", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gripper" in res.stdout and "perplexity" in res.stdout  # the report is printed
    for name in ("tokenizer.safetensors", "tokenizer.json", "action_stats.json", "report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    split = report["split"]
    assert len(split["train"]) == 1 and len(split["val"]) == 1 and not set(split["train"]) & set(split["val"])
    assert len(report["fit"]["val"]["mse_per_dim"]) == 7 and len(report["fit"]["val"]["usage"]) == 8
    assert report["fit"]["train"]["mse"] < 0.05  # 300 steps on one per-step episode's chunks: measured 7.4e-3
    refused = _rsd("train-tokenizer", "--demos", str(demo_file), "--out", str(out), "--steps", "1")
    assert refused.returncode != 0 and "--overwrite" in refused.stderr

    from rsd.policy.factory import make_policy
    from rsd.policy.roundtrip import RFSQRoundTripPolicy

    assert isinstance(make_policy(f"expert-rfsq:{out}"), RFSQRoundTripPolicy)

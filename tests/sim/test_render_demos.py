"""``rsd render-demos`` gives the frames a rendered recording saw: record one rendered DART expert demo of
libero_spatial task 0 (a scene with fixtures, the cabinet and the stove; executed actions differ from the labels),
strip its camera datasets, render the stripped copy back by replaying its states (``rsd.sim.replay_obs``), and
compare with the recorded frames through the same preprocessing (``rsd.train.pixel_data.demo_views``). Then
``rsd train-policy --backbone pixel`` trains on the stripped copy through its views file, and refuses one that does
not match the demo file.

The re-run is deterministic: its proprio equals the recording at every step (``rsd.sim.replay_obs`` checks) and
the frames are bit-identical (also measured on a 154-step drawer demo at 256 px: 0 pixels differ).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_render_demos.py -q``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.sim

if importlib.util.find_spec("libero") is None:
    pytest.skip("LIBERO is not installed: run `bash scripts/setup.sh`", allow_module_level=True)

import h5py  # noqa: E402

from tests._rsd_cli import run_rsd  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CAMERA = "128"  # the replay renders at the recording's size; 128 keeps the recording short here
IMAGE_SIZE = 64


_rsd = run_rsd


def test_replayed_views_equal_the_recorded_frames_and_train(tmp_path: Path) -> None:
    from rsd.sim.demos import read_demos
    from rsd.train.pixel_data import demo_views
    from rsd.train.render_views import read_views

    rendered = tmp_path / "rendered.hdf5"
    res = _rsd("collect", "--suite", "libero_spatial", "--tasks", "0", "--episodes-per-task", "1", "--render",
               "--camera-size", CAMERA, "--action-noise", "0.3", "--out", str(rendered), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    stripped = tmp_path / "stripped.hdf5"
    shutil.copy(rendered, stripped)
    with h5py.File(stripped, "a") as f:
        for key in ("agentview_rgb", "eye_in_hand_rgb"):
            del f[f"data/demo_0/obs/{key}"]

    fixtures = tmp_path / "fixtures.json"
    res = _rsd("render-demos", "--demos", str(stripped), "--camera-size", CAMERA, "--image-size", str(IMAGE_SIZE),
               "--workers", "1", "--fixtures", str(fixtures), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    poses = json.loads(fixtures.read_text())
    assert set(poses["stripped.hdf5:demo_0"]) == {"wooden_cabinet_1", "flat_stove_1"}

    demo = read_demos(rendered, images=True)[0]
    recorded = demo_views(demo, IMAGE_SIZE)  # [T, 2, S, S, 3] from the frames the episode saw
    replayed = next(read_views(stripped, ["demo_0"], IMAGE_SIZE))
    assert replayed.shape == recorded.shape == (demo.num_steps, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert "executed_actions" in demo.obs and not np.array_equal(demo.obs["executed_actions"], demo.actions)
    np.testing.assert_array_equal(replayed, recorded)  # the re-run is the recorded episode, frame for frame

    # other fixture poses show another scene: the fixture walk is what makes the frames equal
    from rsd.sim.libero import make_env
    from rsd.errors import ReplayMismatchError
    from rsd.sim.replay_obs import replay_observations

    moved = {n: [v + 0.05 * (i < 2) for i, v in enumerate(p)] for n, p in poses["stripped.hdf5:demo_0"].items()}
    proprio = np.concatenate([demo.obs[k] for k in ("ee_pos", "ee_ori", "gripper_states")], axis=1)
    scene, executed = demo.attrs["rsd_scene_init_state"], demo.obs["executed_actions"]
    with make_env("libero_spatial", 0, render=True, camera_size=int(CAMERA)) as env:
        first = next(replay_observations(env, scene, moved, executed, proprio))
        wrong = executed.copy()
        wrong[3:13, 1] = np.where(wrong[3:13, 1] > 0, -1.0, 1.0)  # 10 steps the other way: centimetres off
        with pytest.raises(ReplayMismatchError, match=r"step \d+ of \d+: .*\(over 0\.005"):
            list(replay_observations(env, scene, poses["stripped.hdf5:demo_0"], wrong, proprio))
    from rsd.backbones.pixel_views import resize_to_model

    assert not np.array_equal(resize_to_model(first["full_image"][None], IMAGE_SIZE).numpy()[0], recorded[0, 0])

    run = tmp_path / "pixel"
    train = ("train-policy", "--backbone", "pixel", "--demos", str(stripped), "--val-fraction", "0", "--steps", "2",
             "--batch-size", "8", "--warmup-steps", "1", "--eval-every", "2", "--checkpoint-every", "2",
             "--image-size", str(IMAGE_SIZE), "--channels", "8", "--width", "32", "--hidden-dim", "64",
             "--head-width", "32", "--word-buckets", "64", "--device", "cpu", "--no-progress")
    res = _rsd(*train, "--out", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "train.json").read_text())["completed"]

    with h5py.File(stripped, "a") as f:  # the demo file changes: its views no longer belong to it
        f["data"].attrs["edited"] = 1
    res = _rsd(*train, "--out", str(tmp_path / "pixel2"))
    assert res.returncode == 1 and "CheckpointMismatchError" in res.stderr and "render-demos" in res.stderr, res.stderr

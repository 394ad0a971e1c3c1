"""``rsd collect`` -> replayable LIBERO-layout demos -> ``rsd train-tokenizer`` -> ``expert-rfsq:DIR``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_collect_train.py -q`` (about 1 min on an
idle 2-core machine: 2 recorded + 1 replayed unrendered episodes, a 300-step tokenizer fit).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.sim

if importlib.util.find_spec("libero") is None:
    pytest.skip("LIBERO is not installed: run `bash scripts/setup.sh`", allow_module_level=True)

import h5py  # noqa: E402

from rsd.sim import protocol  # noqa: E402
from rsd.sim.demos import action_chunks, read_demos  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUITE = "libero_spatial"


def _rsd(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rsd.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


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
        demo = data["demo_0"]
        T = demo["actions"].shape[0]
        assert demo["actions"].shape == (T, 7) and demo.attrs["num_samples"] == T
        for key, width in (("ee_pos", 3), ("ee_ori", 3), ("ee_states", 6), ("gripper_states", 2), ("joint_states", 7)):
            assert demo["obs"][key].shape == (T, width), key
        assert demo["states"].shape[0] == T and demo["robot_states"].shape == (T, 9)
        np.testing.assert_array_equal(demo.attrs["init_state"], demo["states"][0])
        assert "agentview_rgb" not in demo["obs"]  # unrendered recording
    demos = read_demos(demo_file)
    assert [d.attrs["rsd_init_state_index"] for d in demos] == [0, 1]
    assert action_chunks(demos, 8).shape == (sum(d.num_steps - 7 for d in demos), 8, 7)


def test_recorded_actions_replay_to_success(demo_file: Path) -> None:
    """The file is faithful: from the same init state, the recorded actions reproduce the states and the success."""
    from rsd.sim.libero import make_env

    demo = read_demos(demo_file)[0]
    with make_env(SUITE, 0, render=False) as env:
        env.reset(int(demo.attrs["rsd_init_state_index"]))
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
    assert report["fit"]["train"]["mse"] < 0.05  # 300 steps on one episode's constant chunks: measured 6.4e-3
    refused = _rsd("train-tokenizer", "--demos", str(demo_file), "--out", str(out), "--steps", "1")
    assert refused.returncode != 0 and "--overwrite" in refused.stderr

    from rsd.policy.factory import make_policy
    from rsd.policy.roundtrip import RFSQRoundTripPolicy

    assert isinstance(make_policy(f"expert-rfsq:{out}"), RFSQRoundTripPolicy)

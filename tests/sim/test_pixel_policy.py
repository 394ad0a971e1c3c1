"""A pixel policy end to end on real LIBERO: ``rsd collect --render`` records one expert demo of libero_spatial task 0,
``rsd train-policy --backbone pixel`` trains a tiny pixel policy on it for a few steps, and ``rsd eval`` runs one
rendered episode of the saved RSD policy. Only that the chain runs without error is asserted (the demo holds camera
frames, the training reads them, the eval renders for the policy and records one episode without an error); success
is not: a few steps on one demo teach nothing.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_pixel_policy.py -q`` (101 s on an idle
2-core machine: one rendered expert episode at 128 px, conversion of its frames, 4 training steps, one rendered eval
episode that runs to the step limit).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.sim

if importlib.util.find_spec("libero") is None:
    pytest.skip("LIBERO is not installed: run `bash scripts/setup.sh`", allow_module_level=True)

import h5py  # noqa: E402

from tests._rsd_cli import run_rsd  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUITE = "libero_spatial"
CAMERA = "128"  # rendering cost barely depends on it here; the observation is 224 px either way


_rsd = run_rsd


def test_record_rendered_train_pixel_and_evaluate_one_rendered_episode(tmp_path: Path) -> None:
    demos = tmp_path / "spatial_rendered.hdf5"
    res = _rsd("collect", "--suite", SUITE, "--tasks", "0", "--episodes-per-task", "1", "--render", "--camera-size",
               CAMERA, "--out", str(demos), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    with h5py.File(demos) as f:
        obs = f["data/demo_0/obs"]
        T = f["data/demo_0/actions"].shape[0]
        for key in ("agentview_rgb", "eye_in_hand_rgb"):
            assert obs[key].shape == (T, int(CAMERA), int(CAMERA), 3) and obs[key].dtype == "uint8", key

    run = tmp_path / "pixel"
    res = _rsd("train-policy", "--backbone", "pixel", "--demos", str(demos), "--out", str(run), "--val-fraction", "0",
               "--steps", "4", "--batch-size", "8", "--warmup-steps", "1", "--eval-every", "2", "--checkpoint-every",
               "2", "--image-size", "64", "--channels", "8", "--width", "32", "--hidden-dim", "64", "--head-width",
               "32", "--word-buckets", "64", "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((run / "train.json").read_text())
    assert report["completed"] and report["steps"] == 4 and report["train_config"]["backbone_name"] == "pixel"
    saved = json.loads((run / "rsd" / "policy.json").read_text())
    assert saved["backbone"]["name"] == "pixel"

    out = tmp_path / "eval"
    res = _rsd("eval", "--suite", SUITE, "--policy", str(run / "rsd"), "--tasks", "0", "--trials", "1",
               "--max-episodes", "1", "--device", "cpu", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["render"] is True  # a pixel policy is rendered for
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines() if line.strip()]
    assert len(episodes) == 1 and episodes[0].get("error") is None and episodes[0]["steps"] > 0, episodes


PIXEL_POLICY = ROOT / "results" / "pixel" / "policy_s0"  # trained on the H200 (docs/pixel-policy.md)


def test_trained_pixel_policy_succeeds_rendered_on_cpu(tmp_path: Path) -> None:
    """The pixel policy trained on the GPU machine, evaluated here on CPU with CPU rendering: two rendered episodes
    (libero_spatial tasks 0 and 4, trial 0; both succeed there with the GPU too) must succeed, with speculative exact
    decoding checked against greedy on every chunk. A broken image path (rotation, JPEG, resize, crop, view order)
    fails them: the policy reads only pixels, proprio and the instruction. The policy was trained on views rendered
    with NVIDIA's EGL, and this box renders with Mesa (other pixels, 4 of 9 libero_object task 0 episodes here against 8
    of 9 there: docs/pixel-policy.md section 4); these two episodes succeeded on both."""
    out = tmp_path / "eval"
    res = _rsd("eval", "--suite", SUITE, "--policy", str(PIXEL_POLICY / "rsd"), "--tasks", "0,4", "--trials", "1",
               "--decode", "exact", "--check-greedy", "--device", "cpu", "--video", "none", "--out", str(out),
               "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines() if line.strip()]
    assert [(e["task_id"], e["success"], e["error"]) for e in episodes] == [(0, True, None), (4, True, None)], episodes
    spec = json.loads((out / "summary.json").read_text())["overall"]["speculative"]
    assert spec["greedy_checked_chunks"] == spec["chunks"] > 0 and spec["greedy_mismatched_chunks"] == 0, spec

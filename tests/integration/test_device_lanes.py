"""``scripts/device_lanes.sh``: lanes of evals started detached, watched and collected, here with a stand-in for
``scripts/device_pixel.sh`` that records its arguments and environment and writes an eval's result files."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

FAKE_EVAL = r"""#!/usr/bin/env bash
# stands in for device_pixel.sh eval ARGS: writes --out's files, two episodes (one success)
set -euo pipefail
cmd="$1"; shift  # device_pixel.sh eval ARGS
out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [[ "${args[i]}" == --out ]] && out="${args[i+1]}"; done
mkdir -p "$out"
echo "$cmd EGL=${MUJOCO_EGL_DEVICE_ID:-unset} args: $*"
printf '{"success": true}\n{"success": false}\n' > "$out/episodes.jsonl"
echo '{}' > "$out/run.json"; echo '{}' > "$out/summary.json"
"""


def _lanes(root: Path, state: Path, *args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, RSD_LANES_DIR=str(state))
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(root / "scripts" / "device_lanes.sh"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_lanes_run_their_evals_in_turn_with_their_environment_and_are_collected(tmp_path: Path) -> None:
    root, state, out = tmp_path / "repo", tmp_path / "state", tmp_path / "out"
    (root / "scripts").mkdir(parents=True)
    out.mkdir()
    shutil.copy(ROOT / "scripts" / "device_lanes.sh", root / "scripts" / "device_lanes.sh")
    (root / "scripts" / "device_pixel.sh").write_text(FAKE_EVAL)
    lane_a, lane_b = tmp_path / "a.txt", tmp_path / "b.txt"
    lane_a.write_text("# two evals, one after the other\n"
                      "MUJOCO_EGL_DEVICE_ID=1 --suite libero_spatial --trials 50 --out runs/s/one\n"
                      "\n"
                      "MUJOCO_EGL_DEVICE_ID=1 --suite libero_spatial --trials 50 --out runs/s/two\n")
    lane_b.write_text("--suite libero_object --out runs/s/three\n")

    started = _lanes(root, state, "start", str(lane_a), str(lane_b))
    assert started.returncode == 0, started.stderr
    assert "started lane a" in started.stdout and "2 evals" in started.stdout and "1 evals" in started.stdout
    watched = _lanes(root, state, "watch", "60")
    assert watched.returncode == 0, watched.stderr
    assert "every lane is done" in watched.stdout
    assert "one 1/2" in watched.stdout.splitlines()[-2] and "three 1/2" in watched.stdout.splitlines()[-2]

    log_a = (state / "a.log").read_text()
    assert log_a.index("runs/s/one") < log_a.index("runs/s/two")  # in turn
    assert "[a] eval EGL=1 args: --suite libero_spatial --trials 50 --out runs/s/one --resume" in log_a
    assert "[b] eval EGL=unset args: --suite libero_object --out runs/s/three --resume" in (state / "b.log").read_text()

    collected = _lanes(root, state, "collect", out=out)
    assert collected.returncode == 0, collected.stderr
    with tarfile.open(out / "lanes.tar") as tar:
        names = set(tar.getnames())
    assert {f"runs/s/{r}/{f}" for r in ("one", "two", "three") for f in ("episodes.jsonl", "run.json",
                                                                          "summary.json")} <= names
    assert {"a.log", "b.log", "a.lane", "b.lane"} <= names

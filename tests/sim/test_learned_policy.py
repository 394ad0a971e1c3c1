"""The shipped learned policy (``rsd eval`` with no ``--policy``) in closed loop on real LIBERO, unrendered.

Threshold, from the full run (docs/learned-policies.md, results/learned/closed_loop_bounds/): the packaged RSD
policy, greedy (speculative exact, checked equal to greedy on every chunk), reached 490 / 500 = 98.0 % (Wilson
96.4 - 98.9 %) on libero_spatial (10 tasks x 50 init states). Here: tasks 0-9, trials 0-1 (20 episodes; that run had
all 20). With p = 0.964 (the full run's Wilson lower bound), P(successes <= 16 of 20) = 0.5 % (0.06 % at 0.98): the
test asserts at least 17, i.e. a Wilson 95 % lower bound >= 0.63 (17/20 -> 0.640). The episodes are deterministic
on one machine; the margin absorbs float differences between machines and torch builds, while a broken head,
decoder or un-normalization (0-30 %; the drawer task alone, when its turn was unreachable, cost 9 points) fails it.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_learned_policy.py -q`` (about 1.5 min on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sim

if importlib.util.find_spec("libero") is None:
    pytest.skip("LIBERO is not installed: run `bash scripts/setup.sh`", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
WILSON_LOW_MIN = 0.63


def _eval(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rsd.cli", "eval", "--suite", "libero_spatial", "--no-progress",
                           "--device", "cpu", "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learned") / "default"
    res = _eval(out, "--tasks", "0-9", "--trials", "2", "--workers", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_the_shipped_rsd_policy_succeeds_in_closed_loop(default_run: Path) -> None:
    run = json.loads((default_run / "run.json").read_text())
    assert run["policy"].endswith("lowdim_rsd") and run["render"] is False  # the default: learned, no images
    summary = json.loads((default_run / "summary.json").read_text())
    overall = summary["overall"]
    assert overall["n"] == 20 and overall["errors"] == 0
    assert overall["ci_low"] >= WILSON_LOW_MIN, (f"{overall['successes']}/20 succeeded (Wilson low "
                                                 f"{overall['ci_low']:.3f} < {WILSON_LOW_MIN}): the full run had 98.0 %")


def test_speculative_exact_acts_exactly_as_greedy(default_run: Path, tmp_path: Path) -> None:
    res = _eval(tmp_path / "exact", "--tasks", "0,4", "--trials", "1", "--decode", "exact")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "exact" / "summary.json").read_text())
    spec = summary["overall"]["speculative"]
    assert spec["greedy_checked_chunks"] > 20 and spec["greedy_mismatched_chunks"] == 0
    greedy = {(e["task_id"], e["trial"]): (e["success"], e["steps"])
              for e in map(json.loads, (default_run / "episodes.jsonl").read_text().splitlines())}
    exact = {(e["task_id"], e["trial"]): (e["success"], e["steps"])
             for e in map(json.loads, (tmp_path / "exact" / "episodes.jsonl").read_text().splitlines())}
    assert exact == {key: greedy[key] for key in exact}  # same actions -> same episodes, step for step

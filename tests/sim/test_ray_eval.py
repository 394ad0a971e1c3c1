"""``rsd eval``'s Ray backend (``RayRunner``) on real LIBERO, unrendered, against the serial runner on the same keys:
episode for episode the same success and steps, also through ``rsd eval --backend ray``; the actors resolve LIBERO's
config where the driver does; an actor killed in the middle of an episode is replaced, the episode re-run and
recorded once; ``--policy-server`` with the packaged low-dimensional policy equals a serial run.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_ray_eval.py -q`` (about 80 s on an idle 2-core
machine for 4 expert episodes in this process, 2 through the command line, the same 4 on 2 Ray actors, then 2 of
them with a kill; the policy-server test adds about 40 s).
"""

from __future__ import annotations

import functools
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
ray = pytest.importorskip("ray", reason="the dist extra is not installed: pip install 'rsd[dist]'")

from rsd import eval as ev  # noqa: E402
from rsd.eval.ray_backend import RayRunner  # noqa: E402
from rsd.eval.runners import SerialRunner, WorkerSettings  # noqa: E402
from rsd.sim.experts import ScriptedExpert  # noqa: E402
from tests._ray_world import KeyAwareWorker, expert_killing_once, expert_reporting_setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUITE = "libero_spatial"
TASKS, TRIALS = (0, 1), 2


def _config(out: Path, tasks: tuple[int, ...] = TASKS) -> ev.EvalConfig:
    return ev.EvalConfig(suite=SUITE, policy="expert", out=out, trials=TRIALS, tasks=tasks, render=False,
                         video="none", progress=False, plot=False)


def _settings(out: Path) -> WorkerSettings:
    return WorkerSettings(suite=SUITE, render=False, camera_size=128, seed=7, video="none", out=out)


def _outcomes(out: Path) -> dict[tuple[int, int], tuple[bool, int]]:
    eps = [json.loads(x) for x in (out / ev.RESULTS_NAME).read_text().splitlines() if x.strip()]
    assert len(eps) == len({(r["task_id"], r["trial"]) for r in eps}), "an episode was recorded twice"
    assert all(r["error"] is None for r in eps)
    return {(r["task_id"], r["trial"]): (r["success"], r["steps"]) for r in eps}


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict[tuple[int, int], tuple[bool, int]]:
    """The same episodes by the serial runner, in this process."""
    out = tmp_path_factory.mktemp("serial")
    keys = ev.episode_keys(_config(out), TASKS)
    got = {(r.task_id, r.trial): (r.success, r.steps)
           for r in SerialRunner(_settings(out), ScriptedExpert).results(keys) if r.error is None}
    assert len(got) == len(keys) == 4
    return got


def test_rsd_eval_backend_ray_on_the_command_line(serial, tmp_path: Path) -> None:
    """The command line's ``--backend ray`` (rsd.eval.cli -> RayRunner, a local Ray instance of its own)."""
    out = tmp_path / "cli"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "rsd.cli", "eval", "--suite", SUITE, "--policy", "expert", "--tasks",
                          "1", "--trials", str(TRIALS), "--no-render", "--no-progress", "--backend", "ray",
                          "--workers", "2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _outcomes(out) == {k: v for k, v in serial.items() if k[0] == 1}
    assert json.loads((out / ev.RUN_NAME).read_text())["backend"] == "ray"


@pytest.fixture(scope="module")
def cluster(serial):
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_ray_equals_serial_and_actors_resolve_the_drivers_libero_config(serial, cluster, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from rsd.sim.setup import ensure_libero_config

    home = tmp_path / "home"  # rsd's home moved after Ray started: only the runner can tell the actors
    monkeypatch.setenv("RSD_HOME", str(home))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", "")  # restored after the test; ensure_libero_config sets it
    config_dir = ensure_libero_config()
    assert config_dir == home / "libero"
    reports = tmp_path / "reports"
    reports.mkdir()
    runner = RayRunner(_settings(tmp_path / "out"), functools.partial(expert_reporting_setup, str(reports)), 2)
    outcome = ev.evaluate(_config(tmp_path / "out"), TASKS, runner=runner)
    assert outcome.exit_code == 0 and runner.restarts == 0
    assert _outcomes(tmp_path / "out") == serial
    seen = [json.loads(p.read_text()) for p in reports.glob("setup-*.json")]
    assert len(seen) == 2
    for s in seen:
        assert s["config_dir"] == str(config_dir) and s["rsd_home"] == str(home)
        assert s["env"]["MUJOCO_GL"] is not None and s["env"]["OMP_NUM_THREADS"] == "1"


def test_a_killed_actor_mid_episode_is_replaced_and_the_episode_counted_once(serial, cluster,
                                                                              tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    runner = RayRunner(_settings(tmp_path / "out"), functools.partial(expert_killing_once, (1, 0), str(marker)), 2)
    runner.worker_factory = KeyAwareWorker
    outcome = ev.evaluate(_config(tmp_path / "out", tasks=(1,)), (1,), runner=runner)  # 2 episodes, 1 env each
    assert len(marker.read_text().split()) == 1  # killed once, at its second chunk of task 1 trial 0
    assert outcome.exit_code == 0 and runner.restarts == 1
    assert _outcomes(tmp_path / "out") == {k: v for k, v in serial.items() if k[0] == 1}



def test_policy_server_on_the_command_line_equals_the_serial_runner(tmp_path: Path) -> None:
    """``rsd eval --backend ray --policy-server``: the packaged low-dimensional RSD policy in one policy actor serving
    2 env actors in batches, against the same episodes run serially (on CPU its tokens do not depend on the batch)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    common = ["--suite", SUITE, "--policy", "lowdim", "--tasks", "0", "--trials", str(TRIALS), "--no-render",
              "--no-progress", "--device", "cpu"]
    runs = {"serial": [], "served": ["--backend", "ray", "--policy-server", "--workers", "2"]}
    for name, extra in runs.items():
        res = subprocess.run([sys.executable, "-m", "rsd.cli", "eval", *common, *extra, "--out", str(tmp_path / name)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    assert _outcomes(tmp_path / "served") == _outcomes(tmp_path / "serial")
    summary = json.loads((tmp_path / "served" / ev.SUMMARY_NAME).read_text())
    assert summary["batched"]["chunks"] > 0 and summary["batched"]["workers"] == 2

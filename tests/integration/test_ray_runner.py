"""``RayRunner`` (``rsd eval --backend ray``) on a real local Ray instance with episodes on ``FakeEnv`` (no LIBERO):
the same results as in this process, the driver's environment in every actor, a killed actor's episode re-run and
counted once, an episode that kills every actor recorded as ``WorkerDied``, a bad checkpoint raised as itself.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/integration/test_ray_runner.py -q`` (about 40 s on an
idle 2-core machine, most of it Ray starting twice).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray", reason="the dist extra is not installed: pip install 'rsd[dist]'")

from rsd import eval as ev  # noqa: E402
from rsd.errors import CheckpointNotFoundError, ConfigError  # noqa: E402
from tests._ray_world import (SEEN_ENV, TASKS, BadCheckpoint, FakeEnvWorker, Push, fake_config,  # noqa: E402
                              fake_runner, fake_settings, push_killing_once)

ROOT = Path(__file__).resolve().parents[2]


def _episodes(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / ev.RESULTS_NAME).read_text().splitlines() if x.strip()]


def _outcomes(out: Path) -> dict[tuple[int, int], tuple[bool, int, str | None]]:
    eps = _episodes(out)
    assert len(eps) == len({(r["task_id"], r["trial"]) for r in eps}), "an episode was recorded twice"
    return {(r["task_id"], r["trial"]): (r["success"], r["steps"], r["error"]) for r in eps}


@functools.cache
def _in_process() -> dict[tuple[int, int], tuple[bool, int, str | None]]:
    """The episodes run by one FakeEnvWorker in this process (what every runner must reproduce)."""
    worker = FakeEnvWorker(fake_settings(Path(".")), Push())
    keys = ev.episode_keys(fake_config(Path("unused")), TASKS)
    return {(k.task_id, k.trial): (r.success, r.steps, r.error) for k in keys for r in [worker.run(k)]}


def test_in_process_reference_has_successes_and_failures() -> None:
    ref = _in_process()
    assert len(ref) == 8 and {s for s, _, _ in ref.values()} == {True, False}  # the comparison can tell them apart
    assert ref[(0, 0)] == (True, 4, None) and ref[(1, 0)] == (True, 8, None) and ref[(0, 3)][:2] == (False, 220)


def test_local_instance_runs_the_episodes_and_is_shut_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The instance the runner starts inherits the driver's environment: its actors see it without a runtime_env
    (so Ray's pre-started workers can become the actors)."""
    assert not ray.is_initialized()
    wanted = {"RSD_HOME": str(tmp_path / "home"), "MUJOCO_GL": "disabled", "OMP_NUM_THREADS": "1",
              "LIBERO_CONFIG_PATH": str(tmp_path / "home" / "libero"), "PYOPENGL_PLATFORM": None}
    for k, v in wanted.items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)
    reports = tmp_path / "reports"
    reports.mkdir()
    runner = fake_runner(tmp_path / "out", functools.partial(Push, str(reports)))
    real_options, options = runner._actor_options, []

    def recorded_options(*args, **kwargs) -> dict:
        options.append(real_options(*args, **kwargs))
        return options[-1]

    monkeypatch.setattr(runner, "_actor_options", recorded_options)
    outcome = ev.evaluate(fake_config(tmp_path / "out"), TASKS, runner=runner)
    assert outcome.exit_code == 0 and outcome.new_episodes == 8
    assert _outcomes(tmp_path / "out") == _in_process()
    assert (tmp_path / "out" / ev.RUN_NAME).is_file() and runner.restarts == 0
    assert not ray.is_initialized()  # the instance it started is gone
    assert len(options) == 1 and "runtime_env" not in options[0]
    seen = [json.loads(p.read_text()) for p in sorted(reports.glob("actor-*.json"))]
    assert len(seen) == 2 and all(s["env"] == {k: wanted.get(k) for k in SEEN_ENV} for s in seen)


def test_an_address_where_no_cluster_runs_is_refused_at_once(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runner = fake_runner(tmp_path / "out", Push, address=f"127.0.0.1:{port}")
    t0 = time.monotonic()
    refused = rf"--address 127.0.0.1:{port}: no Ray cluster answers at .*:{port}.*ray start --head"
    with pytest.raises(ConfigError, match=refused):
        list(runner.results(ev.episode_keys(fake_config(tmp_path / "out"), TASKS)))
    assert time.monotonic() - t0 < 30 and not ray.is_initialized()  # ray.init alone would try for minutes


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the rest of the module (RayRunner uses it and leaves it running)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_actors_see_the_drivers_environment(cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # set after Ray started: only runtime_env can bring them into the actors
    wanted = {"RSD_HOME": str(tmp_path / "home"), "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa",
              "LIBERO_CONFIG_PATH": str(tmp_path / "home" / "libero"), "OMP_NUM_THREADS": "1"}
    for k, v in wanted.items():
        monkeypatch.setenv(k, v)
    reports = tmp_path / "reports"
    reports.mkdir()
    runner = fake_runner(tmp_path / "out", functools.partial(Push, str(reports)))
    assert ev.evaluate(fake_config(tmp_path / "out"), TASKS, runner=runner).exit_code == 0
    seen = [json.loads(p.read_text()) for p in sorted(reports.glob("actor-*.json"))]
    assert len(seen) == 2 and {s["pid"] for s in seen}.isdisjoint({os.getpid()})
    for s in seen:
        assert s["env"] == {k: wanted.get(k) for k in SEEN_ENV}
        assert s["torch_threads"] == 1
    assert ray.is_initialized()  # not started by the runner: left running


_DRIVER = """
import sys
from pathlib import Path
import ray
from rsd import eval as ev
from tests._ray_world import TASKS, Push, fake_config, fake_runner
out = Path(sys.argv[2])
outcome = ev.evaluate(fake_config(out), TASKS, runner=fake_runner(out, Push, address=sys.argv[1]))
print("exit", outcome.exit_code, "connected", ray.is_initialized())
"""


def test_address_connects_to_the_cluster_and_leaves_it_running(cluster, tmp_path: Path) -> None:
    """Another process drives the episodes on this module's Ray instance through ``address``."""
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", _DRIVER, address, str(tmp_path / "out")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exit 0 connected False" in res.stdout  # disconnected at the end
    assert _outcomes(tmp_path / "out") == _in_process()
    assert ray.cluster_resources()["CPU"] == 2  # the cluster still runs


def test_a_killed_actor_s_episode_runs_again_and_counts_once(cluster, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    runner = fake_runner(tmp_path / "out", functools.partial(push_killing_once, (1, 2), str(marker)))
    outcome = ev.evaluate(fake_config(tmp_path / "out"), TASKS, runner=runner)
    assert len(marker.read_text().split()) == 1  # one actor was killed in the middle of task 1 trial 2
    assert outcome.exit_code == 0 and runner.restarts == 1
    assert _outcomes(tmp_path / "out") == _in_process()  # every episode once, the re-run one as if never killed


def test_an_episode_that_kills_every_actor_is_recorded_as_worker_died(cluster, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "killed"
    runner = fake_runner(tmp_path / "out", functools.partial(push_killing_once, (0, 0), str(marker), always=True),
                     workers=1)
    outcome = ev.evaluate(fake_config(tmp_path / "out", trials=3, tasks=(0,)), (0,), runner=runner)
    assert len(marker.read_text().split()) == runner.retries + 1 == 3  # tried 3 times, on 3 actors
    assert outcome.exit_code == 1
    (ep,) = _episodes(tmp_path / "out")  # the run stopped there: no further episode was dispatched
    assert (ep["task_id"], ep["trial"], ep["success"]) == (0, 0, False)
    assert ep["error"].startswith("WorkerDied: the Ray actor died 3 times") and "task 0 trial 0" in ep["error"]
    assert "re-running it on a fresh actor" in capsys.readouterr().err


def test_a_policy_that_cannot_be_made_raises_in_the_driver(cluster, tmp_path: Path) -> None:
    runner = fake_runner(tmp_path / "out", BadCheckpoint())
    t0 = time.monotonic()
    with pytest.raises(CheckpointNotFoundError, match="no policy at /nowhere") as info:
        ev.evaluate(fake_config(tmp_path / "out"), TASKS, runner=runner)
    assert time.monotonic() - t0 < 60 and runner.restarts == 0
    assert any("in Ray eval actor" in note for note in info.value.__notes__)
    assert not (tmp_path / "out" / ev.RESULTS_NAME).exists() or not _episodes(tmp_path / "out")


def test_a_cuda_policy_on_a_cluster_without_gpus_is_refused(cluster, tmp_path: Path) -> None:
    runner = fake_runner(tmp_path / "out", Push, policy_device="cuda")
    with pytest.raises(ConfigError, match="the Ray cluster has no GPU.*--device cpu"):
        list(runner.results(ev.episode_keys(fake_config(tmp_path / "out"), TASKS)))


def test_more_workers_than_the_cluster_has_cpus_is_refused(cluster, tmp_path: Path) -> None:
    runner = fake_runner(tmp_path / "out", Push, workers=3)
    with pytest.raises(ConfigError, match="has 2 CPUs.*--workers 2 or fewer"):
        list(runner.results(ev.episode_keys(fake_config(tmp_path / "out"), TASKS)))


def test_closing_the_results_early_ends_the_actors(cluster, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    runner = fake_runner(tmp_path / "out", functools.partial(Push, str(reports), barrier=2))  # both actors up
    results = runner.results(ev.episode_keys(fake_config(tmp_path / "out"), TASKS))
    next(results)
    results.close()  # what Ctrl-C in evaluate's loop does to the generator
    pids = [json.loads(p.read_text())["pid"] for p in reports.glob("actor-*.json")]
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    """The process runs (a zombie waiting for its parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

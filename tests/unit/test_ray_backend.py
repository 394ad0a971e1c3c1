"""``rsd.eval.ray_backend`` without starting Ray: the missing package, GPU shares, the environment passed to actors,
the actor body (policy made at start, a failure kept for the driver). Ray itself runs in
tests/integration/test_ray_runner.py and tests/sim/test_ray_eval.py."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from rsd.errors import CheckpointNotFoundError, ConfigError
from rsd.eval import ray_backend as rb
from rsd.eval.records import EpisodeKey
from rsd.eval.runners import WorkerSettings

pytestmark = pytest.mark.unit

SETTINGS = WorkerSettings(suite="libero_spatial", render=False, camera_size=128, seed=7, video="none", out=Path("."))


def test_importing_the_backend_does_not_import_ray() -> None:
    code = "import sys, rsd.eval.ray_backend; print('ray' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_missing_ray_is_a_config_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    runner = rb.RayRunner(SETTINGS, object, 2)
    with pytest.raises(ConfigError, match=r"pip install 'rsd\[dist\]'"):
        list(runner.results([EpisodeKey("libero_spatial", 0, 0)]))


def test_no_episodes_needs_no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    assert list(rb.RayRunner(SETTINGS, object, 2).results([])) == []


def test_workers_below_one_are_refused() -> None:
    with pytest.raises(ConfigError, match="--workers must be >= 1, got 0"):
        rb.RayRunner(SETTINGS, object, 0)


@pytest.mark.parametrize(("device", "gpus", "workers", "share"), [
    ("cpu", 8, 4, 0.0), ("cpu", 0, 4, 0.0), (None, 8, 4, 0.0),  # a CPU or scripted policy asks for no GPU
    ("cuda", 8, 4, 1.0), ("cuda", 8, 8, 1.0), ("cuda:0", 2, 2, 1.0),  # one whole GPU each at most
    ("cuda", 1, 4, 0.25), ("cuda", 2, 3, 0.6666), ("cuda", 1, 3, 0.3333),  # shares, rounded down: all actors fit
])
def test_gpu_share_per_actor(device: str | None, gpus: float, workers: int, share: float) -> None:
    got = rb.gpus_per_actor(device, gpus, workers)
    assert got == share
    assert got * workers <= gpus  # every actor fits on the cluster's GPUs


def test_a_cuda_policy_on_a_cluster_without_gpus_is_refused() -> None:
    with pytest.raises(ConfigError, match="the Ray cluster has no GPU.*--device cpu"):
        rb.gpus_per_actor("cuda", 0, 2)


def test_a_cuda_index_is_refused() -> None:
    with pytest.raises(ConfigError, match="--device cuda:1 with --backend ray.*pass --device cuda"):
        rb.gpus_per_actor("cuda:1", 4, 2)


def test_actors_get_the_set_variables_only() -> None:
    environ = {"RSD_HOME": "/data/rsd", "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "", "CUDA_VISIBLE_DEVICES": "3",
               "HOME": "/root", "LIBERO_CONFIG_PATH": "/data/rsd/libero"}
    assert rb.actor_env_vars(environ) == {"RSD_HOME": "/data/rsd", "MUJOCO_GL": "egl",
                                          "LIBERO_CONFIG_PATH": "/data/rsd/libero"}


class _Worker:
    def __init__(self, settings: WorkerSettings, policy: object) -> None:
        self.settings, self.policy, self.closed = settings, policy, False

    def run(self, key: EpisodeKey) -> tuple:
        return ("ran", key, self.policy)

    def close(self) -> None:
        self.closed = True


def _bad_checkpoint() -> None:
    raise CheckpointNotFoundError("no policy at /nowhere")


def test_the_actor_body_makes_its_policy_and_runs_episodes() -> None:
    actor = rb._EpisodeActor(SETTINGS, lambda: "policy", _Worker, 1)
    kind, where = actor.ready()
    assert kind == "ready" and where.startswith("pid ")
    key = EpisodeKey("libero_spatial", 1, 2)
    assert actor.run(key) == ("ran", key, "policy")
    actor.close()
    assert actor.worker.closed


def test_the_actor_body_keeps_a_failed_start_for_the_driver() -> None:
    actor = rb._EpisodeActor(SETTINGS, _bad_checkpoint, _Worker, 1)  # does not raise: the actor stays alive
    kind, (exc, tb) = actor.ready()
    assert kind == "fatal" and isinstance(exc, CheckpointNotFoundError) and "_bad_checkpoint" in tb
    assert isinstance(pickle.loads(pickle.dumps(exc)), CheckpointNotFoundError)  # it travels to the driver
    actor.close()  # nothing to close


class _RefusingRay:
    """``ray`` where connecting fails as Ray 2.60 does against a cluster that wants a token."""

    @staticmethod
    def is_initialized() -> bool:
        return False

    @staticmethod
    def init(**kwargs: object) -> None:
        try:
            raise RuntimeError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
        except RuntimeError as exc:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from exc


def test_a_cluster_that_refuses_the_driver_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", _RefusingRay)
    monkeypatch.setitem(sys.modules, "ray._private.services", None)  # no probe here: ray.init is what fails
    runner = rb.RayRunner(SETTINGS, object, 2, address="10.0.0.1:6379")
    with pytest.raises(ConfigError, match=r"--address 10.0.0.1:6379: cannot connect.*RAY_AUTH_MODE=token"):
        list(runner.results([EpisodeKey("libero_spatial", 0, 0)]))


def test_the_worker_died_result_names_the_episode() -> None:
    from rsd.eval.runners import worker_died_result

    r = worker_died_result(EpisodeKey("libero_object", 3, 17), 7, "WorkerDied: the Ray actor died 3 times (last: X)")
    assert r.key == EpisodeKey("libero_object", 3, 17) and r.init_state_index == 17 and r.seed == 7
    assert (r.success, r.steps, r.video, r.chunk_latencies_ms) == (False, 0, None, ())
    assert r.error == "WorkerDied: the Ray actor died 3 times (last: X) while running task 3 trial 17"
    assert '"error": "WorkerDied' in r.to_json()  # recordable in episodes.jsonl

"""rsd.sim.libero against real LIBERO (libero_spatial task 0). Needs the sim extra and a headless renderer.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_env.py -q`` (about 1-2 min on 2 CPU cores:
env creation dominates).
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from rsd.errors import ConfigError, NonFiniteError, ShapeError, SimSetupError
from rsd.sim import protocol

pytestmark = pytest.mark.sim

if importlib.util.find_spec("libero") is None:
    pytest.skip("LIBERO is not installed: run `bash scripts/setup.sh`", allow_module_level=True)

from rsd.sim import libero  # noqa: E402

SUITE, TASK = "libero_spatial", 0


@pytest.fixture(scope="module")
def rendered_env():
    with libero.make_env(SUITE, TASK, render=True) as env:
        yield env


@pytest.fixture(scope="module")
def unrendered_env():
    with libero.make_env(SUITE, TASK, render=False) as env:
        yield env


def test_task_list_and_spec() -> None:
    tasks = libero.list_tasks(SUITE)
    assert len(tasks) == 10 and [t.task_id for t in tasks] == list(range(10))
    t0 = tasks[0]
    assert t0.instruction == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert t0.max_steps == 220 and Path(t0.bddl_file).is_file() and Path(t0.init_states_file).is_file()
    with pytest.raises(ConfigError):
        libero.task_spec(SUITE, 10)
    with pytest.raises(ConfigError, match="Available"):
        libero.list_tasks("libero_100")


def test_config_is_written_so_libero_never_prompts(tmp_path: Path) -> None:
    """A fresh HOME and RSD_HOME, no LIBERO_CONFIG_PATH, stdin closed: importing through rsd must not input()."""
    env = {k: v for k, v in os.environ.items() if k != "LIBERO_CONFIG_PATH"}
    env.update(HOME=str(tmp_path / "home"), RSD_HOME=str(tmp_path / "rsd"))
    code = ("from rsd.sim.libero import list_tasks; import os; "
            "print(len(list_tasks('libero_goal')), os.environ['LIBERO_CONFIG_PATH'])")
    res = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["10", str(tmp_path / "rsd" / "libero")]
    config = yaml.safe_load((tmp_path / "rsd" / "libero" / "config.yaml").read_text())
    assert sorted(config) == sorted(["benchmark_root", "bddl_files", "init_states", "datasets", "assets"])
    assert Path(config["bddl_files"], "libero_goal").is_dir() and Path(config["assets"], "scenes").is_dir()
    assert not (tmp_path / "home" / ".libero").exists()  # LIBERO's default location was never touched


def test_stale_config_is_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSD_HOME", str(tmp_path))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", "/nonexistent")  # restored after the test
    stale = tmp_path / "libero" / "config.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text("assets: /moved/away\n")
    assert libero.ensure_libero_config() == tmp_path / "libero"
    assert yaml.safe_load(stale.read_text())["assets"] == str(libero.libero_package_root() / "assets")
    assert os.environ["LIBERO_CONFIG_PATH"] == str(tmp_path / "libero")


def test_init_states_load_from_package_only(tmp_path: Path) -> None:
    states = libero.load_init_states(SUITE, TASK)
    assert states.dtype == np.float64 and states.ndim == 2 and states.shape[0] == 50
    outside = tmp_path / "copy.pruned_init"
    shutil.copy(libero.task_spec(SUITE, TASK).init_states_file, outside)  # a genuine file, wrong place
    with pytest.raises(SimSetupError, match="refusing to unpickle"):
        libero.load_init_state_file(outside)
    sneaky = Path(libero.libero_package_root()) / "init_files" / ".." / ".." / ".." / outside.name
    with pytest.raises(SimSetupError, match="refusing"):
        libero.load_init_state_file(sneaky)


def test_rendered_reset_and_step(rendered_env) -> None:
    env = rendered_env
    assert env.num_init_states == 50 and env.task.suite == SUITE
    obs = env.reset(0)
    for o in (obs, env.step(protocol.dummy_action())[0]):
        assert set(o) == {"full_image", "wrist_image", "state", "object_poses", "object_names", "raw"}
        for key in ("full_image", "wrist_image"):
            assert o[key].shape == (224, 224, 3) and o[key].dtype == np.uint8
            assert o[key].std() > 5  # a real scene, not a blank frame
        assert o["state"].shape == (8,) and o["state"].dtype == np.float32
        assert "akita_black_bowl_1_pos" in o["raw"] and "plate_1_quat" in o["raw"]
        # the privileged object poses: every posed object of the raw obs, sorted, position + quaternion
        names = o["object_names"]
        assert list(names) == sorted(names) and "akita_black_bowl_1" in names and "plate_1" in names
        assert o["object_poses"].shape == (len(names), 7) and o["object_poses"].dtype == np.float32
        i = names.index("plate_1")
        np.testing.assert_array_equal(o["object_poses"][i], np.concatenate(
            [o["raw"]["plate_1_pos"], o["raw"]["plate_1_quat"]]).astype(np.float32))
    # the policy images are exactly protocol.preprocess_image of the raw cameras
    np.testing.assert_array_equal(o["full_image"], protocol.preprocess_image(o["raw"]["agentview_image"]))
    np.testing.assert_array_equal(o["wrist_image"], protocol.preprocess_image(o["raw"]["robot0_eye_in_hand_image"]))
    frame = env.frame()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, o["raw"]["agentview_image"][::-1, ::-1])


def test_proprio_matches_robosuite(unrendered_env) -> None:
    from robosuite.utils.transform_utils import quat2axisangle

    raw = unrendered_env.reset(3)["raw"]
    expected = np.concatenate([raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"].copy()),
                               raw["robot0_gripper_qpos"]]).astype(np.float32)
    np.testing.assert_allclose(protocol.proprio_from_obs(raw), expected, rtol=1e-6, atol=1e-7)


def test_unrendered_episode_and_validation(unrendered_env) -> None:
    env = unrendered_env
    obs = env.reset(1)
    assert set(obs) == {"state", "object_poses", "object_names", "raw"} and "agentview_image" not in obs["raw"]
    start = obs["state"].copy()
    for i in range(5):
        obs, done = env.step([0.5, 0, 0, 0, 0, 0, -1])  # move +x
        assert done is False and env.check_success() is False
    assert env.steps == 5
    assert obs["state"][0] > start[0] + 0.01  # the arm moved along +x
    with pytest.raises(ShapeError):
        env.step(np.zeros(6))
    with pytest.raises(NonFiniteError):
        env.step([0, 0, np.nan, 0, 0, 0, -1])
    with pytest.raises(ConfigError):
        env.reset(50)
    with pytest.raises(ConfigError, match="render=False"):
        env.frame()


def test_done_is_what_step_returns(unrendered_env) -> None:
    """Teleport the target bowl onto the plate: the step that sees it there returns done=True."""
    env = unrendered_env
    env.reset(0)
    _, done = env.step(protocol.dummy_action())
    assert done is False
    sim_env = env.raw_env.env
    joint = sim_env.objects_dict["akita_black_bowl_1"].joints[0]
    plate = sim_env.sim.data.get_body_xpos(sim_env.objects_dict["plate_1"].root_body)
    sim_env.sim.data.set_joint_qpos(joint, np.concatenate([plate + [0.0, 0.0, 0.03], [1.0, 0.0, 0.0, 0.0]]))
    sim_env.sim.forward()
    dones = []
    for _ in range(20):
        _, done = env.step(protocol.dummy_action())
        dones.append(done)
        assert done == env.check_success()
        if done:
            break
    assert dones[-1] is True


def _worker_steps(suite: str, task_id: int) -> tuple[int, list[float]]:
    with libero.make_env(suite, task_id, render=False) as env:
        env.reset(0)
        obs, _ = env.step(protocol.dummy_action())
        return env.num_init_states, obs["state"].tolist()


def test_env_in_spawned_worker(unrendered_env) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        n, state = pool.apply(_worker_steps, (SUITE, TASK))
    unrendered_env.reset(0)
    here, _ = unrendered_env.step(protocol.dummy_action())
    assert n == 50
    np.testing.assert_allclose(state, here["state"], atol=1e-6)  # same init state, same physics

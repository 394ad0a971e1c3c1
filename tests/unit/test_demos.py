"""Demo files (LIBERO layout), action chunks, the tokenizer's action space, the policy registry. No LIBERO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsd.action_space import ActionSpace, env_to_model_gripper
from rsd.errors import ActionGenerationError, CheckpointNotFoundError, ConfigError, ShapeError
from rsd.policy.protocol import ActionChunk
from rsd.sim.demos import DemoWriter, action_chunks, read_demos
from rsd.train.tokenizer_cli import split_by_episode

pytestmark = pytest.mark.unit

h5py = pytest.importorskip("h5py", reason="h5py is required (install rsd[sim])")


def _episode(T: int, seed: int, images: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    obs = {"ee_pos": rng.normal(size=(T, 3)), "ee_ori": rng.normal(size=(T, 3)), "gripper_states": rng.normal(size=(T, 2)),
           "joint_states": rng.normal(size=(T, 7))}
    if images:
        obs["agentview_rgb"] = rng.integers(0, 255, size=(T, 8, 8, 3), dtype=np.uint8)
    actions = np.concatenate([rng.uniform(-1, 1, size=(T, 6)), np.sign(rng.normal(size=(T, 1)))], axis=1)
    return dict(actions=actions, obs=obs, states=rng.normal(size=(T, 5)), robot_states=rng.normal(size=(T, 9)))


def test_writer_reader_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "demos.hdf5"
    infos = [{"problem_name": "p", "domain_name": "robosuite", "language_instruction": f"task {i}"} for i in range(2)]
    eps = [_episode(12, 0, images=True), _episode(9, 1, images=True)]
    with DemoWriter(path, file_attrs={"rsd_suite": "libero_spatial"}) as w:
        for i, (ep, info) in enumerate(zip(eps, infos)):
            w.add(**ep, problem_info=info, attrs={"rsd_task_id": i, "rsd_init_state_index": 3 + i})
    assert not path.with_name(path.name + ".partial").exists()
    demos = read_demos(path)
    assert [d.name for d in demos] == ["demo_0", "demo_1"]
    assert [d.instruction for d in demos] == ["task 0", "task 1"]
    np.testing.assert_array_equal(demos[1].actions, eps[1]["actions"])
    np.testing.assert_array_equal(demos[0].states, eps[0]["states"])
    np.testing.assert_array_equal(demos[0].init_state, eps[0]["states"][0])
    assert "agentview_rgb" not in demos[0].obs  # images only on request
    np.testing.assert_array_equal(read_demos(path, images=True)[0].obs["agentview_rgb"], eps[0]["obs"]["agentview_rgb"])
    assert demos[1].attrs["rsd_init_state_index"] == 4
    with h5py.File(path) as f:
        assert f["data"].attrs["num_demos"] == 2 and f["data"].attrs["total"] == 21
        assert "problem_info" not in f["data"].attrs  # two tasks: no file-level problem_info
        assert list(f["data/demo_0/dones"][()]) == [0] * 11 + [1]


def test_interrupted_writer_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "demos.hdf5"
    with pytest.raises(RuntimeError):
        with DemoWriter(path) as w:
            w.add(**_episode(5, 0), problem_info={"language_instruction": "x"})
            raise RuntimeError("killed")
    assert not path.exists() and not path.with_name(path.name + ".partial").exists()
    with pytest.raises(ConfigError, match="no demo was recorded"):
        with DemoWriter(path):
            pass


def test_reads_official_libero_layout(tmp_path: Path) -> None:
    """LIBERO's create_dataset.py layout: file-level problem_info only, model_file, images always present."""
    path = tmp_path / "pick_up_the_bowl_demo.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation", "domain_name": "robosuite",
                                                  "language_instruction": '"pick up the bowl"'})
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        for i, T in ((0, 7), (1, 10), (2, 4)):  # demo_10 sorting is numeric, checked below
            ep = _episode(T, i, images=True)
            g = data.create_group(f"demo_{i if i < 2 else 10}")
            g.create_dataset("actions", data=ep["actions"])
            g.create_dataset("states", data=ep["states"])
            obs = g.create_group("obs")
            for k, v in ep["obs"].items():
                obs.create_dataset(k, data=v)
            obs.create_dataset("eye_in_hand_rgb", data=ep["obs"]["agentview_rgb"])
            g.attrs["num_samples"] = T
            g.attrs["model_file"] = "<mujoco/>"
            g.attrs["init_state"] = ep["states"][0]
    demos = read_demos(path)
    assert [d.name for d in demos] == ["demo_0", "demo_1", "demo_10"]
    assert {d.instruction for d in demos} == {"pick up the bowl"}
    assert demos[1].num_steps == 10 and "model_file" not in demos[0].attrs


def test_action_chunks_are_sliding_windows_inside_episodes() -> None:
    from rsd.sim.demos import Demo

    a = np.concatenate([np.arange(10)[:, None] * np.ones((1, 7)), ], axis=0)
    b = 100 + np.arange(5)[:, None] * np.ones((1, 7))
    short = np.ones((3, 7))
    demos = [Demo("d0", a, "x"), Demo("d1", b, "x"), Demo("d2", short, "x")]
    chunks = action_chunks(demos, chunk_len=4)
    assert chunks.shape == (7 + 2, 4, 7) and chunks.dtype == np.float32
    np.testing.assert_array_equal(chunks[3, :, 0], [3, 4, 5, 6])
    np.testing.assert_array_equal(chunks[7, :, 0], [100, 101, 102, 103])  # no window crosses two demos
    assert action_chunks(demos, chunk_len=4, stride=3).shape == (3 + 1, 4, 7)
    with pytest.raises(ConfigError, match="no action chunk"):
        action_chunks([demos[2]], chunk_len=4)


def test_split_by_episode() -> None:
    train, val = split_by_episode(20, 0.1, seed=0)
    assert len(val) == 2 and sorted(train + val) == list(range(20))
    assert (train, val) == split_by_episode(20, 0.1, seed=0)
    assert val != split_by_episode(20, 0.1, seed=1)[1]
    assert split_by_episode(3, 0.01, seed=0)[1] != []  # a positive fraction holds out at least one episode
    assert split_by_episode(3, 0.0, seed=0) == ([0, 1, 2], [])
    with pytest.raises(ConfigError, match="no training episode"):
        split_by_episode(1, 0.5, seed=0)


def test_action_space_conventions_and_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.uniform(-0.5, 0.8, size=(500, 6)), np.sign(rng.normal(size=(500, 1)))], axis=1)
    space = ActionSpace.fit(actions, source={"demos": ["x"]})
    np.testing.assert_array_equal(env_to_model_gripper(np.array([-1.0, 1.0])), [1.0, 0.0])  # open -> 1, close -> 0
    norm = space.normalize(actions)
    assert norm[:, :6].min() >= -1 and norm[:, :6].max() <= 1
    assert set(np.unique(norm[:, 6])) == {0.0, 1.0}
    back = space.to_env(norm)
    inside = np.all((actions[:, :6] >= space.stats.q01[:6]) & (actions[:, :6] <= space.stats.q99[:6]), axis=1)
    np.testing.assert_allclose(back[inside, :6], actions[inside, :6], atol=1e-5)  # only clipping is lossy
    np.testing.assert_array_equal(back[:, 6], actions[:, 6])
    space.save(tmp_path)
    loaded = ActionSpace.load(tmp_path)
    np.testing.assert_array_equal(loaded.stats.q99, space.stats.q99)
    assert loaded.source == {"demos": ["x"]}
    with pytest.raises(CheckpointNotFoundError, match="train-tokenizer"):
        ActionSpace.load(tmp_path / "nope")


class _ConstantPolicy:
    def __init__(self, chunk_len: int) -> None:
        self.chunk_len = chunk_len

    def reset(self) -> None:
        pass

    def predict_chunk(self, observation, instruction):
        a = np.full((self.chunk_len, 7), 0.3, np.float32)
        a[:, 6] = 1.0
        return ActionChunk(actions=a, info={"inner": True})


def test_rfsq_round_trip_policy(tmp_path: Path) -> None:
    import torch

    from rsd.config import RSDConfig
    from rsd.policy.factory import make_policy
    from rsd.policy.roundtrip import RFSQRoundTripPolicy
    from rsd.tokenizer import RFSQTokenizer

    cfg = RSDConfig.tiny()
    torch.manual_seed(0)
    RFSQTokenizer.from_config(cfg).save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ActionSpace.fit(np.concatenate([rng.uniform(-1, 1, (100, 6)), np.ones((100, 1))], axis=1)).save(tmp_path)
    policy = RFSQRoundTripPolicy.from_dir(_ConstantPolicy(cfg.chunk_len), tmp_path)
    chunk = policy.predict_chunk({}, "x")
    assert chunk.actions.shape == (cfg.chunk_len, 7) and chunk.actions.dtype == np.float32
    assert set(np.unique(chunk.actions[:, 6])) <= {-1.0, 0.0, 1.0}
    assert chunk.info["inner"] and chunk.info["rfsq_roundtrip"]["normalized_mse"] >= 0
    wrong = RFSQRoundTripPolicy.from_dir(_ConstantPolicy(cfg.chunk_len + 1), tmp_path)
    with pytest.raises(ActionGenerationError) as err:
        wrong.predict_chunk({}, "x")
    assert isinstance(err.value.__cause__, ShapeError)

    with pytest.raises(ConfigError, match="expert-rfsq"):
        make_policy("no-such-policy")
    with pytest.raises(CheckpointNotFoundError):
        make_policy(f"expert-rfsq:{tmp_path / 'missing'}")

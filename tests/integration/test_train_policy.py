"""``rsd train-policy`` on a few synthetic demos (no LIBERO): losses fall, checkpoints round-trip exactly, a
resumed run equals an uninterrupted one bit for bit, strict loads refuse another config, the saved directories
load as policies and act on an observation of the low-dimensional contract.

The demos are written with rsd's own ``DemoWriter`` in the layout ``rsd collect`` records: proprio parts,
two objects' poses, an instruction per task, smooth actions that depend on where the target object is.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rsd.action_space import ActionSpace
from rsd.errors import CheckpointMismatchError, ConfigError
from rsd.observation import OBJECT_NAMES, OBJECT_POSES, STATE
from rsd.sim.demos import DemoWriter
from rsd.tokenizer import RFSQTokenizer
from rsd.train.policy import CHECKPOINT_DIR, PolicyModel, TrainConfig, Trainer
from tests._train_world import (TINY, assert_losses_fall, assert_resume_equals_uninterrupted, reaching_demo,
                                tiny_tokenizer, train_on)

pytestmark = pytest.mark.integration

TASKS = {"put the bowl on the plate": ["akita_black_bowl_1", "plate_1"],
         "put the soup in the basket": ["alphabet_soup_1", "basket_1", "milk_1"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_policy")
    rng = np.random.default_rng(0)
    demos = root / "demos.hdf5"
    all_actions = []
    with DemoWriter(demos) as writer:
        for instruction, names in TASKS.items():
            for k in range(6):
                d = reaching_demo(rng, names)
                all_actions.append(d["actions"])
                writer.add(**d, problem_info={"language_instruction": instruction},
                           attrs={"rsd_objects": json.dumps(names), "rsd_task_id": 0})
    return {"root": root, "demos": demos, "tokenizer": tiny_tokenizer(root / "tokenizer", all_actions)}


def _config(**kw) -> TrainConfig:
    base = dict(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, eval_every=20, checkpoint_every=20,
                backbone={"hidden_dim": TINY.hidden_dim, "width": 16, "layers": 1, "heads": 2, "word_buckets": 64,
                          "motion": True},
                head_width=TINY.head_width, draft_layers=TINY.draft_layers)
    base.update(kw)
    return TrainConfig(**base)


def test_losses_fall_and_the_saved_policies_act(world: dict, tmp_path: Path) -> None:
    from rsd.policy import load_policy

    report = train_on(world, tmp_path / "run", _config(steps=120, eval_every=40, checkpoint_every=60))
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [e["step"] for e in curve] == [40, 80, 120]
    assert_losses_fall(curve)
    assert report["completed"] and report["data"]["val"] == 3 and report["data"]["train"] == 9  # split by episode
    assert not set(report["split"]["train"]) & set(report["split"]["val"])
    clipping = report["clipping"]  # per task: what the tokenizer's action space cannot represent
    assert clipping and all(set(e["clipped_fraction"]) == {"dx", "dy", "dz", "droll", "dpitch", "dyaw"}
                            for e in clipping.values())
    val = report["final_val"]
    assert len(val["token_accuracy_greedy"]) == TINY.num_layers and len(val["draft_accuracy"]) == TINY.draft_layers
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000
    obs = {STATE: np.zeros(8, np.float32), OBJECT_NAMES: tuple(TASKS["put the bowl on the plate"]),
           OBJECT_POSES: np.array([[0.1, 0.0, 0.0, 0, 0, 0, 1], [0.2, 0.1, 0, 0, 0, 0, 1]], np.float32)}
    for kind in ("rsd", "l1"):
        policy = load_policy(tmp_path / "run" / kind)
        chunk = policy.predict_chunk(obs, "put the bowl on the plate")
        assert chunk.actions.shape == (TINY.chunk_len, 7) and np.isfinite(chunk.actions).all()
        assert chunk.info["used_rfsq"] == (kind == "rsd")
        # the backbone reads motion since the previous chunk: a moved arm acts differently; reset() forgets it
        moved = {**obs, STATE: np.full(8, 0.05, np.float32)}
        again = policy.predict_chunk(moved, "put the bowl on the plate")
        policy.reset()
        fresh = policy.predict_chunk(moved, "put the bowl on the plate")
        assert again.info["hidden_norm"] != fresh.info["hidden_norm"]  # (tokens may coincide; the hidden state not)
        policy.reset()
        replay = policy.predict_chunk(obs, "put the bowl on the plate")
        np.testing.assert_array_equal(replay.actions, chunk.actions)
        assert replay.info["hidden_norm"] == chunk.info["hidden_norm"]


def test_resume_continues_where_it_stopped(world: dict, tmp_path: Path) -> None:
    stopped = train_on(world, tmp_path / "run", _config(steps=20))
    assert stopped["steps"] == 20
    report = train_on(world, tmp_path / "run", _config(steps=40), resume=True)  # more steps: allowed on resume
    assert report["steps"] == 40 and report["completed"]
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [e["step"] for e in curve] == [20, 40]


@pytest.fixture(scope="module")
def data(world: dict):
    from rsd.sim.demos import read_demos
    from rsd.train.policy_data import build_policy_data

    tokenizer = RFSQTokenizer.from_pretrained(world["tokenizer"])
    return tokenizer, build_policy_data(read_demos(world["demos"]), tokenizer, ActionSpace.load(world["tokenizer"]),
                                        word_buckets=64)


def test_a_resumed_run_equals_an_uninterrupted_one(data, tmp_path: Path) -> None:
    tokenizer, arrays = data
    rows = np.arange(len(arrays))
    config = _config(steps=40, eval_every=20, checkpoint_every=10)

    def trainer(out: str) -> Trainer:
        return Trainer(config, TINY, arrays, rows, rows[:8], tokenizer, tmp_path / out, meta={})

    assert_resume_equals_uninterrupted(trainer, killed_at_checkpoint=10)  # killed at step 20, checkpoint 10


def test_checkpoints_round_trip_exactly(data, tmp_path: Path) -> None:
    tokenizer, data = data
    rows = np.arange(len(data))
    config = _config(steps=10)
    first = Trainer(config, TINY, data, rows, rows[:0], tokenizer, tmp_path, meta={"data": "x"})
    first.train(progress=False)
    second = Trainer(config, TINY, data, rows, rows[:0], tokenizer, tmp_path, meta={"data": "x"})
    second.load_checkpoint()
    assert second.step == 10
    for (k, v), (k2, v2) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    for s1, s2 in zip(first.optimizer.state_dict()["state"].values(), second.optimizer.state_dict()["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    other = Trainer(replace(config, lr=1e-4), TINY, data, rows, rows[:0], tokenizer, tmp_path, meta={"data": "x"})
    with pytest.raises(ConfigError, match="other settings"):
        other.load_checkpoint()
    moved = Trainer(config, TINY, data, rows, rows[:0], tokenizer, tmp_path, meta={"data": "y"})
    with pytest.raises(ConfigError, match="other settings"):
        moved.load_checkpoint()


def test_strict_loads_refuse_a_mismatched_config(world: dict, tmp_path: Path) -> None:
    from rsd.checkpoint import load_module

    train_on(world, tmp_path / "run", _config(steps=20))
    wider = PolicyModel(TINY, {"hidden_dim": TINY.hidden_dim, "width": 32, "layers": 1, "heads": 2, "word_buckets": 64})
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_module(wider, tmp_path / "run" / CHECKPOINT_DIR / "model.safetensors")
    with pytest.raises(ConfigError, match="other settings"):
        train_on(world, tmp_path / "run", _config(steps=40, head_width=64), resume=True)


def test_a_time_limit_stops_early_and_saves_everything(world: dict, tmp_path: Path) -> None:
    report = train_on(world, tmp_path / "run", _config(steps=10_000), time_limit_s=0.0)
    assert not report["completed"] and 1 <= report["steps"] < 10_000
    assert (tmp_path / "run" / "rsd" / "policy.json").is_file() and (tmp_path / "run" / CHECKPOINT_DIR).is_dir()

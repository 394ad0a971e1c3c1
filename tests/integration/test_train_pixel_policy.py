"""``rsd train-policy --backbone pixel`` on a few synthetic rendered demos (no LIBERO): losses fall, a killed and
resumed run equals an uninterrupted one bit for bit (random crops included), the saved directories load as policies
and act on an observation of the image contract (224 px views + state), demos without images are refused by name.

The demos (``tests._train_world``) are written with rsd's own ``DemoWriter`` in the layout ``rsd collect --render``
records: proprio parts, raw 32 px camera frames in which a bright square marks the target the actions move towards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rsd.action_space import ActionSpace
from rsd.errors import CheckpointNotFoundError, ConfigError
from rsd.images import IMAGE_SIZE
from rsd.observation import FULL_IMAGE, STATE, WRIST_IMAGE
from rsd.sim.demos import DemoWriter
from rsd.tokenizer import RFSQTokenizer
from rsd.train.policy import TrainConfig, Trainer
from tests._train_world import (TINY, assert_losses_fall, assert_resume_equals_uninterrupted, reaching_demo,
                                tiny_tokenizer, train_on)

pytestmark = pytest.mark.integration

TASKS = ("put the bowl on the plate", "put the soup in the basket")
RAW = 32  # camera frame side of the synthetic demos


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train_pixel")
    rng = np.random.default_rng(0)
    all_actions = []
    with DemoWriter(root / "demos.hdf5") as writer:
        for instruction in TASKS:
            for _ in range(4):
                d = reaching_demo(rng, camera=RAW)
                all_actions.append(d["actions"])
                writer.add(**d, problem_info={"language_instruction": instruction}, attrs={"rsd_task_id": 0})
    with DemoWriter(root / "unrendered.hdf5") as writer:
        for _ in range(4):
            writer.add(**reaching_demo(rng), problem_info={"language_instruction": TASKS[0]}, attrs={"rsd_task_id": 0})
    return {"root": root, "demos": root / "demos.hdf5", "unrendered": root / "unrendered.hdf5",
            "tokenizer": tiny_tokenizer(root / "tokenizer", all_actions)}


def _config(**kw) -> TrainConfig:
    base = dict(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=20, checkpoint_every=20,
                backbone_name="pixel",
                backbone={"hidden_dim": TINY.hidden_dim, "image_size": 32, "channels": 8, "width": 16,
                          "word_buckets": 64, "center_crop": True},
                head_width=TINY.head_width, draft_layers=TINY.draft_layers)
    base.update(kw)
    return TrainConfig(**base)


def test_losses_fall_and_the_saved_pixel_policies_act(world: dict, tmp_path: Path) -> None:
    from rsd.policy import load_policy

    report = train_on(world, tmp_path / "run", _config(steps=90, eval_every=30, checkpoint_every=90))
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [e["step"] for e in curve] == [30, 60, 90]
    assert_losses_fall(curve)
    assert report["completed"] and report["data"]["val"] == 2 and report["data"]["train"] == 6
    assert report["train_config"]["backbone_name"] == "pixel"
    rng = np.random.default_rng(1)
    obs = {FULL_IMAGE: rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
           WRIST_IMAGE: rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
           STATE: np.zeros(8, np.float32)}
    for kind in ("rsd", "l1"):
        saved = json.loads((tmp_path / "run" / kind / "policy.json").read_text())
        assert saved["backbone"]["name"] == "pixel" and saved["backbone"]["kwargs"]["image_size"] == 32
        policy = load_policy(tmp_path / "run" / kind)
        chunk = policy.predict_chunk(obs, TASKS[0])
        assert chunk.actions.shape == (TINY.chunk_len, 7) and np.isfinite(chunk.actions).all()
        assert chunk.info["used_rfsq"] == (kind == "rsd")
        again = policy.predict_chunk(obs, TASKS[0])  # no history: the same observation gives the same chunk
        np.testing.assert_array_equal(again.actions, chunk.actions)


def test_a_resumed_pixel_run_equals_an_uninterrupted_one(world: dict, tmp_path: Path) -> None:
    from rsd.sim.demos import read_demos
    from rsd.train.pixel_data import build_pixel_data

    tokenizer = RFSQTokenizer.from_pretrained(world["tokenizer"])
    data = build_pixel_data(read_demos(world["demos"], images=True), tokenizer, ActionSpace.load(world["tokenizer"]),
                            image_size=32, word_buckets=64, crop=True)
    assert data.images.shape == (len(data), 2, 32, 32, 3) and data.images.dtype == np.uint8
    rows = np.arange(len(data))
    config = _config(steps=20, eval_every=10, checkpoint_every=5)

    def trainer(out: str) -> Trainer:
        return Trainer(config, TINY, data, rows, rows[:8], tokenizer, tmp_path / out, meta={})

    straight = assert_resume_equals_uninterrupted(trainer, killed_at_checkpoint=5)  # killed at step 10
    other = Trainer(_config(steps=20, eval_every=10, checkpoint_every=5, seed=1), TINY, data, rows, rows[:8],
                    tokenizer, tmp_path / "seed1", meta={})
    other.train(progress=False)  # other crops and batches: other weights (the comparison above can fail)
    assert not torch.equal(other.model.backbone.film.weight, straight.model.backbone.film.weight)


def test_demos_without_images_are_refused_by_name(world: dict, tmp_path: Path) -> None:
    """No camera frames and no views file from ``rsd render-demos`` beside the demo file: refused, naming both fixes."""
    with pytest.raises(CheckpointNotFoundError, match=r"rsd render-demos .*rsd collect --render"):
        train_on(world, tmp_path / "run", _config(), demos="unrendered")


def test_pixel_options_are_refused_for_the_lowdim_backbone() -> None:
    import argparse

    from rsd.train.policy_cli import add_arguments, backbone_kwargs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--demos", "x.hdf5", "--out", "o"]
    with pytest.raises(ConfigError, match="--image-size"):
        backbone_kwargs(parser.parse_args(base + ["--image-size", "64"]))
    with pytest.raises(ConfigError, match="--motion"):
        backbone_kwargs(parser.parse_args(base + ["--backbone", "pixel", "--motion"]))
    assert backbone_kwargs(parser.parse_args(base))["motion"] is True  # lowdim defaults unchanged
    pixel = backbone_kwargs(parser.parse_args(base + ["--backbone", "pixel", "--no-crop", "--image-size", "64"]))
    assert pixel["image_size"] == 64 and pixel["center_crop"] is False and pixel["width"] == 128


def test_the_arrays_hold_the_evaluation_images_at_the_model_size(world: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from rsd.backbones.pixel_views import resize_to_model
    from rsd.sim.demos import read_demos
    from rsd.sim.protocol import preprocess_image
    from rsd.train.pixel_data import demo_views

    demo = read_demos(world["demos"], images=True)[0]
    views = demo_views(demo, 64)  # [T, 2, 64, 64, 3]
    assert views.shape == (demo.num_steps, 2, 64, 64, 3) and views.dtype == np.uint8
    for v, key in enumerate(("agentview_rgb", "eye_in_hand_rgb")):
        for t in (0, demo.num_steps - 1):  # what rsd eval's observation holds, resized as the backbone resizes it
            observed = preprocess_image(demo.obs[key][t])
            np.testing.assert_array_equal(views[t, v], resize_to_model(observed[None], 64)[0].numpy())
    with ThreadPoolExecutor(2) as pool:
        np.testing.assert_array_equal(demo_views(demo, 64, pool), views)


def test_batches_gathered_from_the_device_copy_are_the_host_batches(world: dict) -> None:
    """``PixelData.to_device`` (CUDA training gathers its batches there): the same inputs, crops and targets."""
    from rsd.sim.demos import read_demos
    from rsd.train.pixel_data import build_pixel_data

    tokenizer = RFSQTokenizer.from_pretrained(world["tokenizer"])
    data = build_pixel_data(read_demos(world["demos"], images=True), tokenizer, ActionSpace.load(world["tokenizer"]),
                            image_size=32, word_buckets=64, crop=True)
    rows = np.array([5, 0, 5, 3])
    host = data.batch(rows, augment=np.random.default_rng(7))
    data.to_device("cpu")
    assert data.device_images is not None and data.device_images.data_ptr() != 0
    moved = data.batch(rows, augment=np.random.default_rng(7))
    for a, b in ((host[0].images, moved[0].images), (host[0].crops, moved[0].crops), (host[1], moved[1]),
                 (host[2], moved[2])):
        assert torch.equal(a, b)
    data.images = np.zeros_like(data.images)  # and they are read from the device copy, not from the host array
    assert torch.equal(data.batch(rows, augment=np.random.default_rng(7))[0].images, host[0].images)

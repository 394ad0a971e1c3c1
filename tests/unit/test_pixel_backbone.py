"""``PixelBackbone`` (both views + state + instruction -> hidden) and its image geometry (``pixel_views``): shapes, FiLM
conditioning, named refusals, a bit-exact strict save/load, the 0.9-area crop (random at training, centred at
evaluation)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rsd.backbones import load_backbone, save_backbone
from rsd.backbones.pixel import PixelBackbone, PixelInputs, pixel_inputs
from rsd.backbones.pixel_views import (CROP_AREA, centre_crop_boxes, crop_and_resize, random_crop_boxes,
                                       resize_to_model)
from rsd.errors import CheckpointMismatchError, ConfigError, DTypeError, ShapeError
from rsd.images import IMAGE_SIZE
from rsd.observation import FULL_IMAGE, STATE, WRIST_IMAGE

pytestmark = pytest.mark.unit

A, B = "put the bowl on the plate", "open the top drawer of the cabinet"


def _backbone(**kw) -> PixelBackbone:
    return PixelBackbone(**{"hidden_dim": 32, "image_size": 32, "channels": 8, "width": 16, "word_buckets": 64,
                            **kw}).eval()


def _obs(seed: int = 0, batch: int | None = None) -> dict:
    return _backbone().observation_spec.fake(seed, batch=batch)


@torch.inference_mode()
def test_encode_gives_one_hidden_row_per_observation() -> None:
    bb = _backbone()
    assert bb.reads_images and bb.observation_spec.image_size == IMAGE_SIZE  # the contract stays 224 px
    assert bb.encode(_obs(), A).shape == (1, 32)
    hidden = bb.encode(_obs(batch=3), [A, B, A])
    assert hidden.shape == (3, 32) and hidden.dtype == torch.float32 and torch.isfinite(hidden).all()
    inputs = pixel_inputs(_obs(batch=3), A, bb.observation_spec, 32, 64)
    assert inputs.images.shape == (3, 2, 32, 32, 3) and inputs.images.dtype == torch.uint8


@torch.inference_mode()
def test_film_conditions_the_image_features_on_the_instruction() -> None:
    bb = _backbone()
    torch.nn.init.normal_(bb.film.weight, std=0.5)  # a trained FiLM (it starts at zero: the plain conv stack)
    obs = _obs()
    a = pixel_inputs(obs, A, bb.observation_spec, 32, 64)
    b = pixel_inputs(obs, B, bb.observation_spec, 32, 64)
    views_a, _ = bb.view_features(a)
    views_b, _ = bb.view_features(b)
    assert views_a.shape == (1, 2, 16)
    assert not torch.allclose(views_a, views_b, atol=1e-4)  # same pixels, other instruction: other image features
    assert not torch.allclose(bb.forward_inputs(a), bb.forward_inputs(b), atol=1e-4)
    torch.nn.init.zeros_(bb.film.weight)
    torch.nn.init.zeros_(bb.film.bias)
    same_a, _ = bb.view_features(a)
    same_b, _ = bb.view_features(b)
    torch.testing.assert_close(same_a, same_b, rtol=0, atol=0)  # ... and the difference came from FiLM alone


def test_wrong_observations_are_refused_naming_the_key() -> None:
    bb = _backbone()
    obs = _obs()
    with pytest.raises(DTypeError, match=FULL_IMAGE):
        bb.encode({**obs, FULL_IMAGE: obs[FULL_IMAGE].astype(np.float32)}, A)
    with pytest.raises(ShapeError, match=WRIST_IMAGE):
        bb.encode({**obs, WRIST_IMAGE: obs[WRIST_IMAGE][:128, :128]}, A)  # a model-size image is not the contract
    with pytest.raises(ShapeError, match=WRIST_IMAGE):
        bb.encode({k: v for k, v in obs.items() if k != WRIST_IMAGE}, A)
    with pytest.raises(ShapeError, match=STATE):
        bb.encode({**obs, STATE: np.zeros(7, np.float32)}, A)
    with pytest.raises(ShapeError, match="instructions"):
        bb.encode(_obs(batch=2), [A])
    good = pixel_inputs(obs, A, bb.observation_spec, 32, 64)
    with pytest.raises(DTypeError, match="uint8"):
        PixelInputs(good.images.float(), good.state, good.instruction_ids)
    with pytest.raises(ShapeError, match="crops"):
        PixelInputs(good.images, good.state, good.instruction_ids, torch.zeros(1, 3))
    with pytest.raises(ShapeError, match="image_size=32"):
        bb.forward_inputs(pixel_inputs(obs, A, bb.observation_spec, 64, 64))
    with pytest.raises(ConfigError, match="center_crop=False"):
        _backbone(center_crop=False).forward_inputs(PixelInputs(good.images, good.state, good.instruction_ids,
                                                                torch.zeros(1, 2, 3)))
    for bad in ({"image_size": 256}, {"channels": 12}, {"center_crop": 1}, {"width": 4}):
        with pytest.raises(ConfigError):
            _backbone(**bad)


@torch.inference_mode()
def test_save_load_round_trip_is_bit_exact_and_strict(tmp_path) -> None:
    bb = _backbone()
    bb.fit_input_stats(np.random.default_rng(0).normal(size=(50, 8)),
                       np.random.default_rng(1).integers(0, 200, (10, 32, 32, 3), dtype=np.uint8))
    torch.nn.init.normal_(bb.film.weight, std=0.1)
    spec = save_backbone(bb, tmp_path)
    assert spec["name"] == "pixel" and json.loads(json.dumps(spec)) == spec
    loaded = load_backbone(spec, tmp_path)
    for (k, v), (k2, v2) in zip(bb.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert "pixel_mean" in loaded.state_dict() and loaded.pixel_std.max() < 127.0  # the fitted statistics travel
    obs = _obs(3, batch=2)
    assert torch.equal(bb.encode(obs, A), loaded.encode(obs, A))
    with pytest.raises(CheckpointMismatchError):
        load_backbone({"name": "pixel", "kwargs": {**spec["kwargs"], "channels": 16}}, tmp_path)
    with pytest.raises(ConfigError, match="do not fit PixelBackbone"):
        load_backbone({"name": "pixel", "kwargs": {**spec["kwargs"], "layers": 2}}, tmp_path)


def test_the_crop_keeps_0_9_of_the_area_random_in_training_centred_at_evaluation() -> None:
    rng = np.random.default_rng(0)
    boxes = random_crop_boxes(rng, 500)
    side = boxes[:, 2]
    assert torch.allclose(side * side, torch.full((500,), CROP_AREA))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + side[:, None] <= 1 + 1e-6).all()
    assert boxes[:, 0].std() > 0.01 and boxes[:, 1].std() > 0.01  # positions vary
    assert torch.equal(boxes, random_crop_boxes(np.random.default_rng(0), 500))  # seeded: bit-exact resume
    centre = centre_crop_boxes(4)
    assert torch.allclose(centre[:, :2], torch.full((4, 2), (1 - math.sqrt(CROP_AREA)) / 2))
    # on a ramp image, bilinear sampling reads back exactly where each output pixel of the box samples
    S = 64
    ramp = torch.arange(S, dtype=torch.float32) * 3.0  # value = 3 * column
    image = ramp.view(1, 1, S, 1).expand(1, S, S, 3).to(torch.uint8)  # [1, S, S, 3]: columns 0..63 -> 0..189
    for box in (centre[:1], boxes[:1]):
        top, left, s = box[0].tolist()
        out = crop_and_resize(image, box)  # [1, 3, S, S]
        expected = 3.0 * (left * S + s * S * (torch.arange(S) + 0.5) / S - 0.5)
        inside = (expected >= 0) & (expected <= 3.0 * (S - 1))
        torch.testing.assert_close(out[0, 0, 0][inside], expected[inside].float(), atol=1e-3, rtol=0)
        span = (expected[-1] - expected[0]) / 3.0 + s  # width covered, in pixels
        assert span == pytest.approx(math.sqrt(CROP_AREA) * S, rel=1e-5)
    full = crop_and_resize(image, torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(full, image.permute(0, 3, 1, 2).float(), atol=1e-3, rtol=0)  # side 1: the image


@torch.inference_mode()
def test_evaluation_uses_the_centre_crop_and_training_boxes_change_the_input() -> None:
    bb = _backbone()
    inputs = pixel_inputs(_obs(batch=2), A, bb.observation_spec, 32, 64)
    centre = PixelInputs(inputs.images, inputs.state, inputs.instruction_ids,
                         centre_crop_boxes(4).view(2, 2, 3))
    assert torch.equal(bb.forward_inputs(inputs), bb.forward_inputs(centre))  # None = the centre crop
    moved = PixelInputs(inputs.images, inputs.state, inputs.instruction_ids,
                        random_crop_boxes(np.random.default_rng(0), 4).view(2, 2, 3))
    assert not torch.equal(bb.forward_inputs(inputs), bb.forward_inputs(moved))
    uncropped = _backbone(center_crop=False)
    whole = PixelInputs(inputs.images, inputs.state, inputs.instruction_ids,
                        torch.tensor([0.0, 0.0, 1.0]).expand(2, 2, 3).clone())
    torch.testing.assert_close(uncropped.forward_inputs(inputs), bb.forward_inputs(whole), atol=1e-4, rtol=0)
    assert not torch.allclose(uncropped.forward_inputs(inputs), bb.forward_inputs(inputs), atol=1e-4)  # no crop


def test_resize_to_model_is_deterministic_and_the_identity_at_the_observation_size() -> None:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    assert resize_to_model(images, IMAGE_SIZE) is images
    small = resize_to_model(images, 128)
    assert small.shape == (2, 128, 128, 3) and small.dtype == torch.uint8
    assert torch.equal(small, resize_to_model(images.numpy(), 128))
    with pytest.raises(DTypeError, match="uint8"):
        resize_to_model(images.float(), 128)


def test_the_default_backbone_is_small() -> None:
    bb = PixelBackbone()
    params = sum(p.numel() for p in bb.parameters())
    assert 0.5e6 < params < 2e6, params  # ~4 MB of float32; the saved RSD directory stays well under 20 MB


def test_a_saved_pixel_policy_carries_its_crop_into_the_run_identity(tmp_path) -> None:
    from rsd.action_space import ActionSpace
    from rsd.config import RSDConfig
    from rsd.heads import L1ActionHead
    from rsd.policy.identity import model_center_crop
    from rsd.policy.learned import L1Policy

    cfg = RSDConfig.tiny()
    stats = ActionSpace.fit(np.random.default_rng(0).uniform(-1, 1, (64, 7))).stats
    for crop in (True, False):
        bb = _backbone(hidden_dim=cfg.hidden_dim, center_crop=crop)
        L1Policy(bb, L1ActionHead(cfg), stats, config=cfg).save_pretrained(tmp_path / str(crop))
        assert model_center_crop(str(tmp_path / str(crop))) is crop  # recorded in run.json as center_crop
        with pytest.raises(ConfigError, match="pixel backbone's crop setting is part of its policy.json"):
            model_center_crop(str(tmp_path / str(crop)), center_crop=False)  # --no-center-crop cannot change it

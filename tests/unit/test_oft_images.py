"""rsd.images against OpenVLA-OFT's own image functions run under TensorFlow on real LIBERO frames.

The fixture ``tests/fixtures/oft_images.npz`` holds 8 raw camera frames (agentview and wrist, from
libero_spatial, libero_object, libero_goal and libero_10 scenes) and what OFT's ``resize_image_for_policy``
and ``center_crop_image`` made of them, with the provenance (OFT commit, TensorFlow version).
Regenerate it with ``bash scripts/oft_golden.sh OFT_CHECKOUT``.

Measured floor (docs/oft-images.md): per image at most 2 of 150,528 values differ, each by 1 level
(summation order in the Lanczos pass); the crop step alone is bit-exact. Thresholds: max 1 level and at
most 16 differing values per image (about 1e-4), mean well under 0.001.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsd.errors import ConfigError, ShapeError
from rsd.images import (center_crop_image, jpeg_round_trip, lanczos3_resize, oft_model_input, rotate_180)
from rsd.sim import protocol

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "oft_images.npz"
MAX_LEVELS = 1  # largest per-value difference allowed
MAX_DIFFERING = 16  # values per image (of 224 * 224 * 3 = 150,528) allowed to differ
MAX_MEAN = 1e-3


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _distance(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean()), int(diff.max()), int((diff > 0).sum())


def test_fixture_is_real_libero_frames_with_provenance(golden: dict[str, np.ndarray]) -> None:
    prov = json.loads(str(golden["provenance"]))
    assert len(prov["oft_commit"]) == 40 and prov["tensorflow"]
    assert prov["oft_functions"] == ["resize_image_for_policy", "crop_and_resize", "center_crop_image"]
    names = [str(n) for n in golden["names"]]
    assert {n.split("/")[0] for n in names} == {"libero_spatial", "libero_object", "libero_goal", "libero_10"}
    assert {n.rsplit("/", 1)[1] for n in names} == {protocol.AGENTVIEW_KEY, protocol.WRIST_KEY}
    assert golden["frames"].shape == (len(names), 256, 256, 3) and golden["frames"].dtype == np.uint8
    assert golden["oft_cropped"].shape == golden["oft_resized"].shape == (len(names), 224, 224, 3)


@pytest.mark.parametrize("center_crop, key", [(False, "oft_resized"), (True, "oft_cropped")])
def test_model_input_matches_oft_on_every_frame(golden: dict[str, np.ndarray], center_crop: bool, key: str) -> None:
    for frame, name, want in zip(golden["frames"], golden["names"], golden[key]):
        got = oft_model_input(frame, center_crop=center_crop)
        mean, worst, differing = _distance(got, want)
        assert worst <= MAX_LEVELS and differing <= MAX_DIFFERING and mean <= MAX_MEAN, (
            f"{name}: mean {mean:.5f}, max {worst}, {differing} values differ from OFT's output")
        # preprocess_image keeps its name and signature and is the same function
        np.testing.assert_array_equal(protocol.preprocess_image(frame, 224, center_crop=center_crop), got)


def test_the_crop_step_alone_is_bit_exact(golden: dict[str, np.ndarray]) -> None:
    for resized, cropped in zip(golden["oft_resized"], golden["oft_cropped"]):
        np.testing.assert_array_equal(center_crop_image(resized), cropped)


def test_the_golden_test_catches_each_known_divergence(golden: dict[str, np.ndarray]) -> None:
    """The three ways a pipeline drifts from OFT's (no crop, PIL's decoder, round-to-nearest crop) all
    exceed the thresholds above on the real frames, so the golden test can fail."""
    frame, oft_uncropped, oft_cropped = golden["frames"][0], golden["oft_resized"][0], golden["oft_cropped"][0]
    # 1. no crop where the model expects one
    assert _distance(oft_model_input(frame, center_crop=False), oft_cropped)[0] > 1.0
    # 2. PIL's accurate-DCT decode instead of TensorFlow's fast one
    buf = io.BytesIO()
    Image.fromarray(rotate_180(frame)).save(buf, format="JPEG", quality=protocol.JPEG_QUALITY)
    pil_decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    mean, worst, _ = _distance(lanczos3_resize(pil_decoded), oft_uncropped)
    assert worst > MAX_LEVELS and mean > MAX_MEAN
    # 3. round-to-nearest instead of OFT's floor(255.5 v) after the bilinear crop
    rounded = _round_to_nearest_crop(oft_uncropped)
    assert _distance(rounded, oft_cropped)[2] > MAX_DIFFERING


def _round_to_nearest_crop(img: np.ndarray) -> np.ndarray:
    """The same bilinear crop (float64), converted back with round-to-nearest instead of floor(255.5 v)."""
    return np.clip(np.round(_bilinear_crop_float(img) * 255.0), 0, 255).astype(np.uint8)


def _bilinear_crop_float(img: np.ndarray) -> np.ndarray:
    h = img.shape[0]
    side = np.sqrt(np.float32(0.9))
    lo = (1 - side) / 2
    pos = lo * (h - 1) + np.arange(h) * (side * (h - 1) / (h - 1))
    i0, i1 = np.floor(pos).astype(int), np.ceil(pos).astype(int)
    f = (pos - i0)
    v = img.astype(np.float64) / 255.0
    rows = v[i0] + (v[i1] - v[i0]) * f[:, None, None]
    return rows[:, i0] + (rows[:, i1] - rows[:, i0]) * f[None, :, None]


# the steps on their own


def test_crop_rounds_down_as_tensorflow_converts_floats() -> None:
    """A 2 x 2 image whose crop lands between levels: floor(255.5 v), not round(255 v)."""
    img = np.zeros((2, 2, 3), np.uint8)
    img[:, 1] = 255  # left column black, right column white
    out = center_crop_image(img)
    # bilinear sample at x = lo (0.0257): v = 0.0257 -> floor(255.5 * 0.0257) = 6, round(255 * 0.0257) = 7
    lo = (1 - np.sqrt(np.float32(0.9))) / 2
    assert out[0, 0, 0] == np.uint8(np.float32(lo) * np.float32(255.5))
    assert out[0, 0, 0] != np.round(255 * lo)


def test_lanczos_weights_are_normalized_and_identity_at_equal_size() -> None:
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(lanczos3_resize(img, 32), img)
    flat = np.full((48, 48, 3), 77, np.uint8)
    np.testing.assert_array_equal(lanczos3_resize(flat, 20), np.full((20, 20, 3), 77, np.uint8))


def test_jpeg_round_trip_uses_the_fast_dct() -> None:
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    accurate = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    fast = jpeg_round_trip(img)
    assert fast.shape == img.shape and fast.dtype == np.uint8
    assert not np.array_equal(fast, accurate)
    assert np.abs(fast.astype(int) - accurate).mean() < 3  # the same image, decoded another way


def test_pipeline_order_and_argument_checks() -> None:
    img = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    expected = center_crop_image(lanczos3_resize(jpeg_round_trip(rotate_180(img)), 24))
    np.testing.assert_array_equal(oft_model_input(img, size=24), expected)
    np.testing.assert_array_equal(protocol.preprocess_image(img, 24, center_crop=True), expected)
    with pytest.raises(ConfigError):
        oft_model_input(img, size=0)
    with pytest.raises(ConfigError):
        jpeg_round_trip(img, quality=0)
    with pytest.raises(ShapeError):
        center_crop_image(np.zeros((1, 5, 3), np.uint8))

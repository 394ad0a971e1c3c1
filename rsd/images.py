"""Camera frame -> model input, pixel for pixel as OpenVLA-OFT's LIBERO evaluation makes it.

OFT's evaluation runs TensorFlow image ops; rsd reproduces each of them without TensorFlow:

1. ``rotate_180``: LIBERO renders upside down; OFT flips both axes (``img[::-1, ::-1]``).
2. ``jpeg_round_trip``: ``tf.image.encode_jpeg`` (quality 95, 4:2:0) then ``tf.io.decode_image``.
   PIL's encoder writes the same entropy-coded data as TensorFlow's; TensorFlow *decodes* with libjpeg's
   fast integer DCT and fancy upsampling, which PIL cannot select, so the decode goes through
   libjpeg-turbo via ``simplejpeg`` with those two settings. Measured: bit-exact on every frame tried.
3. ``lanczos3_resize``: ``tf.image.resize(method="lanczos3", antialias=True)`` then ``tf.round`` (half to
   even) and clip: the same separable kernel (radius 3, widened by the downscale factor, weights
   normalized per output pixel) in float32. Summation order differs from TensorFlow's, so a value lands
   on the other side of a .5 about once in 10^5 values (at most 1 level).
4. ``center_crop_image``: ``tf.image.crop_and_resize`` (bilinear, box of side sqrt(0.9) centred) on the
   image scaled to [0, 1], converted back with ``tf.image.convert_image_dtype``: ``floor(255.5 * v)``,
   not round-to-nearest. Bit-exact.

``oft_model_input`` chains them. ``docs/oft-images.md`` gives the measured distance to OFT's own
functions and how the golden fixture that proves it is regenerated.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from rsd.errors import ConfigError, DTypeError, ShapeError

__all__ = [
    "IMAGE_SIZE",
    "JPEG_QUALITY",
    "CENTER_CROP_AREA",
    "rotate_180",
    "jpeg_round_trip",
    "lanczos3_resize",
    "center_crop_image",
    "oft_model_input",
]

IMAGE_SIZE = 224  # OpenVLA's input resolution
JPEG_QUALITY = 95  # tf.image.encode_jpeg's default, used by OFT's resize_image_for_policy
CENTER_CROP_AREA = 0.9  # OFT's crop_scale: the crop keeps 0.9 of the area (side sqrt(0.9))
_LANCZOS_RADIUS = 3.0
_PI = np.float32(3.14159265359)  # the constant TensorFlow's Lanczos kernel uses


def check_rgb_uint8(img: Any, name: str = "image") -> np.ndarray:
    """``img`` if it is a numpy uint8 [H, W, 3] array; ShapeError / DTypeError naming ``name`` otherwise."""
    if not isinstance(img, np.ndarray):
        raise DTypeError(f"{name} must be a numpy array, got {type(img).__name__}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ShapeError(f"{name} must be [H, W, 3] RGB, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise DTypeError(f"{name} must be uint8, got {img.dtype}")
    return img


def rotate_180(img: np.ndarray) -> np.ndarray:
    """LIBERO renders upside down (OpenGL convention): ``img[::-1, ::-1]`` as a contiguous copy. [H, W, 3]"""
    check_rgb_uint8(img)
    return np.ascontiguousarray(img[::-1, ::-1])


def jpeg_round_trip(img: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """JPEG encode (``quality``, 4:2:0) and decode as TensorFlow does (fast integer DCT, fancy upsampling).

    uint8 [H, W, 3] -> uint8 [H, W, 3]. This is the compression the training data went through (OFT's
    datasets store JPEGs), so the model expects its artefacts.
    """
    import simplejpeg  # libjpeg-turbo with the DCT and upsampling choices exposed

    check_rgb_uint8(img)
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in [1, 100], got {quality}")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return simplejpeg.decode_jpeg(buf.getvalue(), colorspace="RGB", fastdct=True, fastupsample=False)


@functools.lru_cache(maxsize=16)
def _lanczos3_weights(n_in: int, n_out: int) -> np.ndarray:
    """Resampling matrix float32 [n_out, n_in] of TensorFlow's antialiased Lanczos-3 (scale_and_translate)."""
    inv_scale = np.float32(1.0) / np.float32(n_out / n_in)
    kernel_scale = max(inv_scale, np.float32(1.0))  # antialias: widen the kernel when downscaling
    radius = np.float32(_LANCZOS_RADIUS)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    for x in range(n_out):
        sample = np.float32(x + 0.5) * inv_scale  # centre of output pixel x in input coordinates
        start = max(int(math.ceil(sample - radius * kernel_scale - np.float32(0.5))), 0)
        end = min(int(math.floor(sample + radius * kernel_scale - np.float32(0.5))), n_in - 1) + 1
        src = np.arange(start, end, dtype=np.float32)
        pos = np.abs((src + np.float32(0.5) - sample) * (np.float32(1.0) / kernel_scale))
        with np.errstate(divide="ignore", invalid="ignore"):
            w = radius * np.sin(_PI * pos) * np.sin(_PI * pos / radius) / (_PI * _PI * pos * pos)
        w = np.where(pos <= 1e-3, np.float32(1.0), w).astype(np.float32)
        w[pos > radius] = 0.0
        total = np.float32(0.0)
        for v in w:  # sequential float32 sum, as the kernel accumulates it
            total = np.float32(total + v)
        weights[x, start:end] = w * (np.float32(1.0) / total)
    return weights


def lanczos3_resize(img: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Antialiased Lanczos-3 resize to ``size`` x ``size``, rounded half to even and clipped, as
    ``tf.image.resize(method="lanczos3", antialias=True)`` + ``tf.round`` in OFT. uint8 [H, W, 3] -> [size, size, 3]."""
    check_rgb_uint8(img)
    if size <= 0:
        raise ConfigError(f"size must be positive, got {size}")
    h, w = img.shape[:2]
    rows, cols = _lanczos3_weights(h, size), _lanczos3_weights(w, size)
    x = img.astype(np.float32).reshape(h, w * 3)  # [H, W*3]: (w, c) flattened, c fastest
    x = (rows @ x).reshape(size, w, 3)  # [size, W, 3]: vertical pass
    x = np.matmul(cols, x)  # [size, W] @ [size(o), W, 3] -> [size(o), size, 3]: horizontal pass
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def center_crop_image(img: np.ndarray, area: float = CENTER_CROP_AREA) -> np.ndarray:
    """Central crop keeping ``area`` of the image area (side ``sqrt(area)``), resized back to the input size.

    ``tf.image.crop_and_resize`` (bilinear; output pixel i samples input ``y1 (H-1) + i (y2-y1)(H-1)/(h-1)``)
    on the image scaled to [0, 1], converted back to uint8 as ``floor(255.5 v)``. uint8 [H, W, 3] -> same shape.
    """
    check_rgb_uint8(img)
    if not 0.0 < area <= 1.0:
        raise ConfigError(f"center-crop area must be in (0, 1], got {area}")
    h, w = img.shape[:2]
    if h < 2 or w < 2:
        raise ShapeError(f"center crop needs an image of at least 2 x 2 pixels, got {h} x {w}")
    side = np.sqrt(np.float32(area))
    lo = (np.float32(1.0) - side) / np.float32(2.0)
    hi = lo + side

    def taps(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step = (hi - lo) * np.float32(n - 1) / np.float32(n - 1)
        pos = lo * np.float32(n - 1) + np.arange(n, dtype=np.float32) * step
        below = np.floor(pos).astype(np.int64)
        return below, np.ceil(pos).astype(np.int64), (pos - below).astype(np.float32)

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    v = img.astype(np.float32) * np.float32(1.0 / 255.0)
    columns = np.concatenate([x0, x1])

    def lerp_columns(rows: np.ndarray) -> np.ndarray:
        """Source rows ``rows`` lerped between their two source columns: ``left + (right - left) * fx``."""
        both = np.take(v[rows], columns, axis=1)  # one gather of both columns (the arithmetic is TF's)
        left, right = both[:, :w], both[:, w:]
        return left + (right - left) * fx[None, :, None]

    top, bottom = lerp_columns(y0), lerp_columns(y1)
    out = np.clip(top + (bottom - top) * fy[:, None, None], 0.0, 1.0)
    return (out * np.float32(255.5)).astype(np.uint8)  # truncation: TF's convert_image_dtype


def oft_model_input(frame: np.ndarray, *, center_crop: bool = True, size: int = IMAGE_SIZE,
                    rotate: bool = True) -> np.ndarray:
    """A raw LIBERO camera frame -> the exact image an OpenVLA-OFT model sees. uint8 [H, W, 3] -> [size, size, 3].

    rotate 180° (skip with ``rotate=False`` for an already rotated frame) -> JPEG q95 round trip decoded as
    TensorFlow does -> Lanczos-3 antialiased resize to ``size`` -> (``center_crop``) the 0.9-area centre crop
    resized back with OFT's rounding. ``center_crop=True`` is OFT's default: its LIBERO checkpoints were
    trained with random-crop augmentation; pass False only for a model trained without it.
    """
    check_rgb_uint8(frame, "camera frame")
    img = rotate_180(frame) if rotate else frame
    img = lanczos3_resize(jpeg_round_trip(img), size)
    if center_crop:
        img = center_crop_image(img)
    return img

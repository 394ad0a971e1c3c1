"""The pixel policy's view of a camera image: the model-size resize and the 0.9-area crop (train: random, eval: centre).

The observation's images (``rsd.observation``) are OpenVLA-OFT's 224 px model input before its centre crop
(``rsd.images.oft_model_input(frame, center_crop=False)``). :class:`rsd.backbones.pixel.PixelBackbone` sees them as:

    224 px observation image --resize_to_model (once: antialiased bilinear, rounded to uint8)--> S px (S = image_size)
      --crop_and_resize (a square box of side sqrt(0.9); bilinear)--> S px float   (the conv stack's input)

The training arrays go through the very same :func:`resize_to_model` once, when they are built (``rsd.train``); the
crop then differs only in where its box lies. OpenVLA-OFT trains with a random crop of 0.9 of the area
(``RandomResizedCrop(scale=(0.9, 0.9), ratio=(1, 1))``) and evaluates with the centre crop of the same area; the
pixel policy mirrors that: :func:`random_crop_boxes` at train time, :func:`centre_crop_boxes` at evaluation. Both
views are cropped independently. The crop is ``grid_sample`` (bilinear, ``align_corners=False``): output pixel i of
a box ``[lo, lo + side]`` (fractions of the side) samples the input at ``lo + side (i + 0.5) / S``. It is not
TensorFlow's ``crop_and_resize`` (``rsd.images.center_crop_image``, which OpenVLA-OFT models need bit for bit); this
policy is trained and evaluated with the one function here, so the two agree by construction.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from rsd.errors import ConfigError, DTypeError, ShapeError

__all__ = ["CROP_AREA", "resize_to_model", "centre_crop_boxes", "random_crop_boxes", "crop_and_resize", "views_boxes"]

CROP_AREA = 0.9  # OpenVLA-OFT's crop_scale: the crop keeps 0.9 of the area


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor uint8 [N, S, S, 3], got {type(images).__name__}.")
    if images.dtype != torch.uint8:
        raise DTypeError(f"{name} must be uint8 (the observation's pixels), got {images.dtype}.")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ShapeError(f"{name} must be [N, S, S, 3] (square RGB), got {list(images.shape)}.")


def resize_to_model(images: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, s, s, 3] -> uint8 [N, size, size, 3]: antialiased bilinear, rounded half to even, clipped; the
    identity when ``size == s``. Deterministic on the CPU: the training arrays and the evaluation go through it."""
    images = torch.as_tensor(images)
    _check_images(images, "images")
    if images.shape[1] == size:
        return images
    x = rearrange(images.float(), "n h w c -> n c h w")
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return rearrange(x.round().clamp(0, 255).to(torch.uint8), "n c h w -> n h w c")


def _side(area: float) -> float:
    if not 0.0 < area <= 1.0:
        raise ConfigError(f"crop area must be in (0, 1], got {area}.")
    return math.sqrt(area)


def centre_crop_boxes(n: int, area: float = CROP_AREA) -> torch.Tensor:
    """float32 [n, 3] boxes ``(top, left, side)`` in fractions of the image side: the centred square of ``area``."""
    side = _side(area)
    lo = (1.0 - side) / 2.0
    return torch.tensor([[lo, lo, side]], dtype=torch.float32).expand(n, 3).clone()


def random_crop_boxes(rng: np.random.Generator, n: int, area: float = CROP_AREA) -> torch.Tensor:
    """float32 [n, 3] boxes ``(top, left, side)``: squares of ``area`` at uniform random positions inside the image
    (drawn from ``rng``, so a seeded generator gives the same crops: bit-exact resume)."""
    side = _side(area)
    corners = rng.uniform(0.0, 1.0 - side, size=(n, 2))
    return torch.from_numpy(np.concatenate([corners, np.full((n, 1), side)], axis=1).astype(np.float32))


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, S, S, 3] + boxes float32 [N, 3] ``(top, left, side)`` -> float32 [N, 3, S, S] in [0, 255]: each box
    resampled (bilinear) to the full S x S. A box of side 1 at (0, 0) returns the image itself."""
    _check_images(images, "images")
    if boxes.ndim != 2 or boxes.shape != (images.shape[0], 3):
        raise ShapeError(f"crop boxes must be [{images.shape[0]}, 3] (top, left, side), got {list(boxes.shape)}.")
    n, size = images.shape[0], images.shape[1]
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    top, left, side = boxes.unbind(-1)  # [N] each, fractions of the side
    # affine grid: normalized output coords u in [-1, 1] -> input coords (2 lo - 1) + side (u + 1)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = side
    theta[:, 0, 2] = 2.0 * left + side - 1.0  # x
    theta[:, 1, 1] = side
    theta[:, 1, 2] = 2.0 * top + side - 1.0  # y
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)  # [N, S, S, 2]
    x = rearrange(images.float(), "n h w c -> n c h w")
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def views_boxes(boxes: torch.Tensor | None, batch: int, views: int, area: float) -> torch.Tensor:
    """Per-view boxes [B, V, 3] (None = the centre crop for every view) -> [B * V, 3] in ``(b v)`` order."""
    if boxes is None:
        return repeat(centre_crop_boxes(1, area), "1 k -> (n) k", n=batch * views)
    if boxes.shape != (batch, views, 3):
        raise ShapeError(f"crop boxes must be [B={batch}, V={views}, 3], got {list(boxes.shape)}.")
    return rearrange(boxes, "b v k -> (b v) k")

"""Observation + instruction -> OpenVLA(-OFT) model inputs, shared by the checkpoint adapter
(``openvla.py``) and the random-weight timing model (``openvla_shaped.py``).

- :data:`PROMPT_TEMPLATE` OFT's prompt (the task lowercased); :data:`IMAGE_KEYS` OFT's image order;
- :func:`observation_tensors` the observation dict -> images uint8 ``[B, N, S, S, 3]`` and state ``[B, P]``;
- :func:`group_by_prompt` / :func:`ungroup` batch elements whose prompts have the same length run
  together, so no padding is ever attended.

Axis letters: B batch, N images, S image side, P proprio dims, T prompt tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from rsd.backbones.base import image_batch, state_batch
from rsd.backbones.openvla_arch import OpenVLAShape
from rsd.errors import ConfigError, ShapeError
from rsd.prompt import PROMPT_TEMPLATE  # re-exported: OFT's prompt

__all__ = ["PROMPT_TEMPLATE", "IMAGE_KEYS", "observation_tensors", "group_by_prompt", "ungroup"]

IMAGE_KEYS = ("full_image", "wrist_image")  # OFT's image order on LIBERO: third-person first, then wrist


def observation_tensors(observation: dict, shape: OpenVLAShape, *, image_keys: tuple[str, ...] = IMAGE_KEYS
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (images uint8 ``[B, N, S, S, 3]``, state float32 ``[B, P]``, B). Raises ShapeError/DTypeError."""

    keys = image_keys[: shape.num_images]
    if len(keys) != shape.num_images:
        raise ConfigError(f"{shape.num_images} images requested but only image keys {image_keys} are known.")
    images, flags = [], []
    for key in keys:
        image, batched = image_batch(observation, key, shape.image_size)
        images.append(image)
        flags.append(batched)
    state, state_batched = state_batch(observation, shape.proprio_dim)
    sizes = {key: image.shape[0] for key, image in zip(keys, images)} | {"state": state.shape[0]}
    if len(set(flags + [state_batched])) != 1 or len(set(sizes.values())) != 1:
        raise ShapeError(f"observation keys disagree on the batch: leading sizes {sizes}; batch all keys or none.")
    return torch.stack(images, dim=1), state, state.shape[0]


def group_by_prompt(images: torch.Tensor, ids: list[torch.Tensor], state: torch.Tensor
                     ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]]:
    """Batch elements whose prompts have the same length run together (no padding is ever attended):
    ``[(images [b, ...], prompt_ids [b, T], state [b, P], batch indices)]``."""
    by_length: dict[int, list[int]] = {}
    for index, row in enumerate(ids):
        by_length.setdefault(int(row.shape[0]), []).append(index)
    if len(by_length) == 1:  # one length (always at batch 1): the inputs as they are, no gather kernels
        return [(images, torch.stack(ids), state, list(range(len(ids))))]
    groups = []
    for rows in by_length.values():
        pick = torch.tensor(rows, device=images.device)
        groups.append((images[pick], torch.stack([ids[i] for i in rows]), state[pick], rows))
    return groups


def ungroup(outputs: list[torch.Tensor], groups: list[tuple[Any, ...]]) -> torch.Tensor:
    """Inverse of :func:`group_by_prompt` for per-element outputs ``[b, ...]`` -> ``[B, ...]``."""
    if len(outputs) == 1:
        return outputs[0]
    batch = sum(len(g[-1]) for g in groups)
    out = outputs[0].new_empty((batch, *outputs[0].shape[1:]))
    for result, group in zip(outputs, groups):
        out[torch.tensor(group[-1], device=out.device)] = result
    return out

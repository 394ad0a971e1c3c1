"""Observation + instruction -> OpenVLA(-OFT) model inputs, shared by the checkpoint adapter
(``openvla.py``) and the random-weight timing model (``openvla_shaped.py``).

- :data:`PROMPT_TEMPLATE` OFT's prompt (the task lowercased); :data:`IMAGE_KEYS` OFT's image order;
- :func:`observation_spec` what a model reads (``rsd.observation.ObservationSpec``); :func:`observation_tensors` the
  observation dict -> images uint8 ``[B, N, S, S, 3]`` and state ``[B, P]``;
- :func:`group_by_prompt` / :func:`ungroup` batch elements whose prompts have the same length run
  together, so no padding is ever attended.

Axis letters: B batch, N images, S image side, P proprio dims, T prompt tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from rsd.backbones.base import observation_batch
from rsd.backbones.openvla_arch import OpenVLAShape
from rsd.errors import ConfigError
from rsd.observation import IMAGE_KEYS, ObservationSpec  # IMAGE_KEYS re-exported: OFT's image order on LIBERO
from rsd.prompt import PROMPT_TEMPLATE  # re-exported: OFT's prompt

__all__ = ["PROMPT_TEMPLATE", "IMAGE_KEYS", "observation_spec", "observation_tensors", "group_by_prompt", "ungroup"]


def observation_spec(shape: OpenVLAShape) -> ObservationSpec:
    """What a model of ``shape`` reads: the first ``num_images`` cameras of :data:`IMAGE_KEYS` at its image size
    and its proprio vector."""
    if not 1 <= shape.num_images <= len(IMAGE_KEYS):
        raise ConfigError(f"{shape.num_images} images requested but only image keys {IMAGE_KEYS} are known.")
    return ObservationSpec(images=IMAGE_KEYS[: shape.num_images], image_size=shape.image_size,
                           proprio_dim=shape.proprio_dim)


def observation_tensors(observation: dict, shape: OpenVLAShape) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (images uint8 ``[B, N, S, S, 3]``, state float32 ``[B, P]``, B). Raises ShapeError/DTypeError/NonFiniteError
    naming the key (:func:`rsd.backbones.base.observation_batch`)."""
    images, state = observation_batch(observation, observation_spec(shape))
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

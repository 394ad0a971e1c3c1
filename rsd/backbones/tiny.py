"""`TinyBackbone`: a small, CPU-fast, trainable backbone for tests and CPU experiments.

    full_image  uint8 [B, S, S, 3] -> ConvEncoder -> [B, W]   (S = image_size)
    wrist_image uint8 [B, S, S, 3] -> ConvEncoder -> [B, W]   (only with use_wrist)
    instruction words + bigrams -> stable hash -> EmbeddingBag -> [B, W]
    state float32 [B, P] -> MLP -> [B, W]                      (P = proprio_dim)
    concat -> LayerNorm -> Linear -> GELU -> Linear -> hidden float32 [B, D]

The instruction hash is blake2b (not Python's per-process salted ``hash()``), so a word lands in the
same bucket in every process and a saved backbone means the same thing when it is loaded again.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from safetensors.torch import save_file
from torch import nn

from rsd.backbones.base import (
    _check_spec_kwargs,
    check_hidden,
    instructions_for_batch,
    observation_batch,
    register_backbone,
)
from rsd.checkpoint import load_safetensors
from rsd.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    ShapeError,
)
from rsd.observation import FULL_IMAGE, IMAGE_KEYS, ObservationSpec

__all__ = ["TinyBackbone", "instruction_buckets_of", "stable_bucket", "WEIGHTS_FILE"]

WEIGHTS_FILE = "backbone.safetensors"
_WORD = re.compile(r"\w+")

# helper functions


def stable_bucket(token: str, num_buckets: int) -> int:
    """Bucket of ``token`` in ``[0, num_buckets)``: blake2b-64 little-endian mod ``num_buckets``; same in every process."""
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_buckets


def instruction_buckets_of(instruction: str, num_buckets: int) -> list[int]:
    """Buckets of the lowercase words and the word bigrams (``"a b"``) of ``instruction``.

    Bigrams keep word order ("bowl on plate" differs from "plate on bowl"). Raises ShapeError when the
    instruction has no words: an empty instruction would give a meaningless (zero) embedding.
    """
    words = _WORD.findall(instruction.lower())
    if not words:
        raise ShapeError(f"instruction {instruction!r} has no words; pass the task description.")
    tokens = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return [stable_bucket(t, num_buckets) for t in tokens]


# modules


class _ConvEncoder(nn.Module):
    """uint8 [B, S, S, 3] -> [B, W]: three strided convs (/16 overall), 4x4 average pool, linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        c1, c2, c3 = max(width // 4, 8), max(width // 2, 8), width
        self.convs = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=5, stride=4, padding=2),
            nn.GELU(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.proj = nn.Linear(c3 * 16, width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = rearrange(image.float(), "b h w c -> b c h w").mul_(2.0 / 255.0).sub_(1.0)  # [B, 3, S, S] in [-1, 1]
        x = self.convs(x)  # [B, W, 4, 4]
        return self.proj(rearrange(x, "b c h w -> b (c h w)"))  # [B, W]


# main class


@register_backbone("tiny")
class TinyBackbone(nn.Module):
    """Small CNN + hashed bag-of-words + proprio MLP backbone; ``encode(obs, instr) -> float32 [B, D]``.

    Args:
        hidden_dim: D, the output size (RSDConfig.hidden_dim).
        image_size: S; images must be exactly [S, S, 3] uint8 (224 for LIBERO, 32/64 in tests).
        instruction_buckets: hash buckets of the instruction EmbeddingBag.
        proprio_dim: P, the size of observation['state'] (8 on LIBERO).
        use_wrist: also encode observation['wrist_image'] (then it is required).
        width: W, feature width of each branch.
        seed: weights are initialised under ``torch.manual_seed(seed)`` in a forked RNG, so the same
            arguments give the same weights without touching the global RNG; None uses the global RNG.
    """

    backbone_name: str  # set by @register_backbone

    def __init__(
        self,
        hidden_dim: int = 32,
        image_size: int = 224,
        instruction_buckets: int = 4096,
        proprio_dim: int = 8,
        use_wrist: bool = True,
        width: int = 64,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (("hidden_dim", hidden_dim, 1), ("image_size", image_size, 8),
                                 ("instruction_buckets", instruction_buckets, 1),
                                 ("proprio_dim", proprio_dim, 1), ("width", width, 8)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"TinyBackbone `{name}` must be an int >= {low}, got {value!r}.")
        if not isinstance(use_wrist, bool):
            raise ConfigError(f"TinyBackbone `use_wrist` must be a bool, got {use_wrist!r}.")
        self.hidden_dim = hidden_dim
        self.image_size = image_size
        self.instruction_buckets = instruction_buckets
        self.proprio_dim = proprio_dim
        self.use_wrist = use_wrist
        self.width = width
        self.seed = seed
        self.cameras = IMAGE_KEYS if use_wrist else (FULL_IMAGE,)
        self.observation_spec = ObservationSpec(images=self.cameras, image_size=image_size, proprio_dim=proprio_dim)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.image_encoders = nn.ModuleDict({cam: _ConvEncoder(width) for cam in self.cameras})
            self.instruction_embedding = nn.EmbeddingBag(instruction_buckets, width, mode="mean")
            self.proprio = nn.Sequential(nn.Linear(proprio_dim, width), nn.GELU(), nn.Linear(width, width))
            fused = width * (len(self.cameras) + 2)
            self.fuse = nn.Sequential(
                nn.LayerNorm(fused), nn.Linear(fused, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim)
            )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        """observation (design.md dict, unbatched or batched) + instruction(s) -> hidden float32 [B, D].

        Raises ShapeError / DTypeError / NonFiniteError naming the bad key, and with ``check`` (the default)
        DeadHiddenStateError through ``check_hidden``; ``check=False`` returns the hidden state unchecked.
        """
        images, state = observation_batch(observation, self.observation_spec, hint=(
            f"or build TinyBackbone(use_wrist=False), which reads {FULL_IMAGE!r} alone" if self.use_wrist else ""))
        texts = instructions_for_batch(instruction, state.shape[0])

        device = self.device
        features = [enc(image.to(device)) for enc, image in zip(self.image_encoders.values(), images)]
        buckets = [instruction_buckets_of(text, self.instruction_buckets) for text in texts]
        flat = torch.tensor([b for row in buckets for b in row], dtype=torch.long, device=device)
        offsets = torch.tensor(np.cumsum([0] + [len(row) for row in buckets[:-1]]), dtype=torch.long, device=device)
        features.append(self.instruction_embedding(flat, offsets))  # [B, W]
        features.append(self.proprio(state.to(device)))  # [B, W]
        hidden = self.fuse(torch.cat(features, dim=-1)).float()  # [B, D]
        return check_hidden(hidden, self.hidden_dim) if check else hidden

    def forward(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        return self.encode(observation, instruction, check=check)

    # save / load (see rsd.backbones.base)

    def spec_kwargs(self) -> dict[str, Any]:
        return dict(hidden_dim=self.hidden_dim, image_size=self.image_size,
                    instruction_buckets=self.instruction_buckets, proprio_dim=self.proprio_dim,
                    use_wrist=self.use_wrist, width=self.width, seed=self.seed)

    def save_weights(self, directory: Path) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(Path(directory) / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def load_spec(cls, kwargs: dict[str, Any], directory: Path, *, device: str | torch.device = "cpu") -> "TinyBackbone":
        path = Path(directory) / WEIGHTS_FILE
        if not path.is_file():
            raise CheckpointNotFoundError(f"TinyBackbone weights {path} do not exist; save the policy again "
                                          f"(save_backbone writes {WEIGHTS_FILE}).")
        _check_spec_kwargs(cls.__init__, kwargs, "TinyBackbone")
        model = cls(**kwargs)
        state = load_safetensors(path, what="TinyBackbone weights", hint="Save the policy again.")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = {k: (list(state[k].shape), list(v.shape)) for k, v in expected.items()
                  if k in state and state[k].shape != v.shape}
        if missing or unexpected or shapes:
            raise CheckpointMismatchError(
                f"{path} does not match TinyBackbone({kwargs}): missing {missing}, unexpected {unexpected}, "
                f"shape (file, model) mismatches {shapes}."
            )
        model.load_state_dict(state, strict=True)
        return model.to(device)

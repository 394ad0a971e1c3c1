"""One config object for every size in the pipeline.

Axis letters used everywhere in rsd (docstrings, einops patterns, tests):

    B batch · C chunk steps · A action dims · H latent dims · L residual layers · G levels · D hidden
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rsd.errors import ConfigError

# Upper bound of every size (inclusive; the lower bound is 1). Far above any real model (OpenVLA-7B: D = 4096),
# far below what would make a hostile config allocate or loop without end (e.g. hidden_dim 10**9).
SIZE_LIMITS: dict[str, int] = {
    "chunk_len": 1024, "action_dim": 256, "latent_dim": 1024, "num_layers": 64, "num_levels": 255,
    "hidden_dim": 65536, "draft_layers": 64, "head_width": 65536, "tokenizer_width": 65536, "proprio_dim": 1024,
}


def check_size(owner: str, name: str, value: Any, limit: int) -> None:
    """ConfigError naming ``owner``'s field ``name`` unless ``value`` is an int (not a bool) in ``[1, limit]``."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise ConfigError(f"{owner} `{name}` must be an int in [1, {limit}], got {value!r}.")


def check_levels(owner: str, num_levels: int) -> None:
    """ConfigError unless ``num_levels`` is odd and >= 3 (so that 0 is a level)."""
    if num_levels < 3 or num_levels % 2 == 0:
        raise ConfigError(f"{owner} `num_levels` must be odd and >= 3 so that 0 is a level, got {num_levels}.")


@dataclass(frozen=True)
class RSDConfig:
    chunk_len: int = 8  # C: OpenVLA-OFT executes 8-action chunks open loop on LIBERO
    action_dim: int = 7  # A: [dx, dy, dz, droll, dpitch, dyaw, gripper]
    latent_dim: int = 16  # H: RFSQ latent dims per chunk step
    num_layers: int = 8  # L: residual quantization layers
    num_levels: int = 7  # G: levels per layer; odd so that 0 is a level
    hidden_dim: int = 4096  # D: Llama-2-7B hidden size (OpenVLA-class backbones)
    draft_layers: int = 3  # k: coarse layers the draft proposes (L0-L2)
    head_width: int = 512  # trunk width of the heads (a 4096 -> 512 projection)
    tokenizer_width: int = 64  # RFSQ encoder/decoder MLP width (7 -> 64 -> 16)
    proprio_dim: int = 8  # eef_pos 3 + axis-angle 3 + gripper_qpos 2

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_size("RSDConfig", field.name, getattr(self, field.name), SIZE_LIMITS[field.name])
        check_levels("RSDConfig", self.num_levels)
        if self.draft_layers > self.num_layers:
            raise ConfigError(
                f"`draft_layers` ({self.draft_layers}) cannot exceed `num_layers` ({self.num_layers})."
            )

    @property
    def tokens_per_chunk(self) -> int:
        """C·H·L tokens (1024 at the default sizes)."""
        return self.chunk_len * self.latent_dim * self.num_layers

    @classmethod
    def tiny(cls, **overrides: Any) -> "RSDConfig":
        """Small sizes for CPU tests (seconds, not minutes)."""
        base = dict(chunk_len=4, action_dim=7, latent_dim=4, num_layers=4, num_levels=5,
                    hidden_dim=32, draft_layers=2, head_width=32, tokenizer_width=16)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RSDConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"an RSDConfig is a JSON object of sizes, got a {type(data).__name__}: {data!r:.200}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown RSDConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

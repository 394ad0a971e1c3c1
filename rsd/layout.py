"""Token layouts: the one module that knows how RFSQ tokens are arranged.

Canonical layouts (see docs/design.md for the axis letters):

- head logits      ``[B, L, C, H, G]``  (layer-major; what heads emit)
- layer codes      ``[B, L, C, H]``     (greedy argmax of the head logits)
- decoder codes    ``[B, C, H, L]``     (what ``RFSQTokenizer.decode_from_indices`` takes)
- flat (original)  ``[B, L, C*H, G]``   flat index ``c*H + h`` (c-major), as single-head RFSQ research code emits it

Every rearrangement is an einops pattern that names its axes, so a wrong size fails loudly instead of
silently scrambling layers, steps and dims (docs/failure-modes.md, "Wrong tokens", lists the silent variants).
"""

from __future__ import annotations

import torch
from einops import rearrange

from rsd.errors import DTypeError, NonFiniteError, ShapeError

__all__ = [
    "logits_to_codes",
    "codes_to_layers",
    "layers_to_codes",
    "flat_to_canonical",
    "canonical_to_flat",
]


def _check_ndim(x: torch.Tensor, ndim: int, name: str, axes: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"`{name}` must be a torch.Tensor {axes}, got {type(x).__name__}.")
    if x.ndim != ndim:
        raise ShapeError(f"`{name}` must be {axes} ({ndim} dims), got shape {tuple(x.shape)}.")


def _check_codes(x: torch.Tensor, name: str, axes: str) -> None:
    _check_ndim(x, 4, name, axes)
    if x.dtype != torch.int64:
        raise DTypeError(f"`{name}` must be int64 codes {axes}, got {x.dtype}.")


def logits_to_codes(logits: torch.Tensor) -> torch.Tensor:
    """Greedy codes for the decoder: logits ``[B, L, C, H, G]`` -> codes ``[B, C, H, L]`` (int64)."""
    _check_ndim(logits, 5, "logits", "[B, L, C, H, G]")
    if not logits.dtype.is_floating_point:
        raise DTypeError(f"`logits` must be floating point, got {logits.dtype}.")
    if not torch.isfinite(logits).all():
        raise NonFiniteError("`logits` contain NaN/inf: the head (or the hidden state feeding it) is broken.")
    layers = logits.argmax(dim=-1)  # [B, L, C, H]
    return layers_to_codes(layers)


def layers_to_codes(layers: torch.Tensor) -> torch.Tensor:
    """``[B, L, C, H]`` -> ``[B, C, H, L]`` (the decoder layout)."""
    _check_codes(layers, "layers", "[B, L, C, H]")
    return rearrange(layers, "b l c h -> b c h l")


def codes_to_layers(codes: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, L]`` -> ``[B, L, C, H]`` (the head layout); inverse of :func:`layers_to_codes`."""
    _check_codes(codes, "codes", "[B, C, H, L]")
    return rearrange(codes, "b c h l -> b l c h")


def flat_to_canonical(flat_logits: torch.Tensor, chunk_len: int, latent_dim: int) -> torch.Tensor:
    """The flat layout ``[B, L, C*H, G]`` (index ``c*H + h``) -> canonical ``[B, L, C, H, G]``."""
    _check_ndim(flat_logits, 4, "flat_logits", "[B, L, C*H, G]")
    if flat_logits.shape[2] != chunk_len * latent_dim:
        raise ShapeError(
            f"flat axis has {flat_logits.shape[2]} entries but chunk_len*latent_dim = "
            f"{chunk_len}*{latent_dim} = {chunk_len * latent_dim}."
        )
    return rearrange(flat_logits, "b l (c h) g -> b l c h g", c=chunk_len, h=latent_dim)


def canonical_to_flat(logits: torch.Tensor) -> torch.Tensor:
    """Canonical ``[B, L, C, H, G]`` -> the flat ``[B, L, C*H, G]`` (index ``c*H + h``)."""
    _check_ndim(logits, 5, "logits", "[B, L, C, H, G]")
    return rearrange(logits, "b l c h g -> b l (c h) g")

"""Token corruption: replace an exact fraction of RFSQ codes, chosen among chosen layers, by other levels.

``rsd sensitivity`` (``rsd.sensitivity``) uses it to put a known token accuracy on an action chunk: a head whose
tokens are right with probability p executes the decode of codes of which a fraction ``1 - p`` are wrong. Codes are
in the decoder layout ``[B, C, H, L]`` (``rsd.layout``; layer = last axis), int64 in ``[0, G)``.

Modes name which layers are eligible: ``uniform`` every layer, ``coarse`` the given coarse layers (by default 0-1,
the layers carrying most of the action), ``fine`` the rest (:func:`mode_layers`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from einops import rearrange

from rsd.errors import CodeRangeError, ConfigError, DTypeError, ShapeError

__all__ = ["MODES", "corrupt_codes", "corrupted_count", "mode_layers", "parse_layers"]

MODES: tuple[str, ...] = ("uniform", "coarse", "fine")


def corrupted_count(fraction: float, eligible: int) -> int:
    """``round(fraction * eligible)``, halves rounded up (not Python's round-half-to-even)."""
    return int(math.floor(fraction * eligible + 0.5))


def _check_fraction(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
        raise ConfigError(f"fraction must be a number in [0, 1], got {fraction!r}.")
    f = float(fraction)
    if not (math.isfinite(f) and 0.0 <= f <= 1.0):
        raise ConfigError(f"fraction must be in [0, 1] (share of the eligible tokens to corrupt), got {fraction!r}.")
    return f


def _check_layers(layers: Any, num_layers: int) -> list[int]:
    try:
        out = [int(x) for x in layers]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"layers must be a sequence of layer indices, got {layers!r}.") from exc
    if any(isinstance(x, bool) or int(x) != x for x in layers):
        raise ConfigError(f"layers must be integer layer indices, got {list(layers)!r}.")
    if not out:
        raise ConfigError("layers is empty: name at least one layer to corrupt.")
    if len(set(out)) != len(out):
        raise ConfigError(f"layers {out} repeat a layer.")
    bad = [x for x in out if not 0 <= x < num_layers]
    if bad:
        raise ConfigError(f"layers {bad} are out of range: the codes have layers 0-{num_layers - 1}.")
    return sorted(out)


def _check_codes(codes: Any, levels: int) -> None:
    if not isinstance(codes, torch.Tensor):
        raise DTypeError(f"codes must be a torch.Tensor [B, C, H, L], got {type(codes).__name__}.")
    if codes.dtype != torch.int64:
        raise DTypeError(f"codes must be int64 [B, C, H, L], got {codes.dtype}.")
    if codes.ndim != 4:
        raise ShapeError(f"codes must be [B, C, H, L] (4 dims, the decoder layout), got shape {tuple(codes.shape)}.")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= levels):
        raise CodeRangeError(f"codes must be in [0, {levels}), got values in [{int(codes.min())}, "
                             f"{int(codes.max())}]: pass the tokenizer's num_levels as `levels`.")


def corrupt_codes(codes: torch.Tensor, fraction: float, layers: Sequence[int], rng: np.random.Generator, *,
                  levels: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt exactly ``round(fraction * N)`` of the ``N = B*C*H*len(layers)`` tokens of ``layers``.

    The tokens are drawn uniformly without replacement among those of ``layers`` only; each gets a level drawn
    uniformly from the ``levels - 1`` levels other than its own (so every corrupted token differs). ``codes``
    int64 ``[B, C, H, L]`` in ``[0, levels)`` is not modified. Returns ``(corrupted, mask)``: the new codes (same
    shape, dtype and device) and a bool ``[B, C, H, L]`` mask, true where a token was replaced. ``fraction = 0``
    returns a copy of ``codes`` and draws nothing from ``rng``. Deterministic given the state of ``rng``
    (a ``numpy.random.Generator``).
    """
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 2:
        raise ConfigError(f"levels must be an int >= 2 (the tokenizer's num_levels), got {levels!r}.")
    _check_codes(codes, int(levels))
    f = _check_fraction(fraction)
    chosen = _check_layers(layers, int(codes.shape[-1]))
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
                          f"{type(rng).__name__}.")
    b, c, h, _ = codes.shape
    idx = torch.tensor(chosen, dtype=torch.int64, device=codes.device)
    flat = rearrange(codes.index_select(-1, idx), "b c h l -> (b c h l)").cpu().numpy().copy()
    hit = np.zeros(flat.shape, dtype=bool)
    k = corrupted_count(f, flat.size)
    if k:
        where = rng.choice(flat.size, size=k, replace=False)
        shift = rng.integers(1, int(levels), size=k)  # 1..G-1: uniform over the other G-1 levels
        flat[where] = (flat[where] + shift) % int(levels)
        hit[where] = True
    sub = rearrange(torch.from_numpy(flat), "(b c h l) -> b c h l", b=b, c=c, h=h, l=len(chosen))
    sub_hit = rearrange(torch.from_numpy(hit), "(b c h l) -> b c h l", b=b, c=c, h=h, l=len(chosen))
    out = codes.clone()
    out[..., idx] = sub.to(codes.device)
    mask = torch.zeros(codes.shape, dtype=torch.bool, device=codes.device)
    mask[..., idx] = sub_hit.to(codes.device)
    return out, mask


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"0-1"`` / ``"0,2,5"`` / ``"3"`` -> sorted layer indices, each in ``[0, num_layers)``."""
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if hi < lo:
                    raise ValueError(part)
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError as exc:
        raise ConfigError(f"layers {spec!r}: write them as '0-1', '0,2,5' or '3'.") from exc
    return _check_layers(out, num_layers)


def mode_layers(mode: str, coarse: Sequence[int], num_layers: int) -> list[int]:
    """The layers a corruption ``mode`` draws from: ``uniform`` all, ``coarse`` the ``coarse`` ones, ``fine`` the
    others. ``fine`` with every layer coarse (or ``coarse`` with none) is refused."""
    coarse_layers = _check_layers(coarse, num_layers)
    if mode == "uniform":
        return list(range(num_layers))
    if mode == "coarse":
        return coarse_layers
    if mode == "fine":
        fine = [x for x in range(num_layers) if x not in coarse_layers]
        if not fine:
            raise ConfigError(f"coarse layers {coarse_layers} are all {num_layers} layers: no fine layer is left.")
        return fine
    raise ConfigError(f"unknown corruption mode {mode!r}; choose from {', '.join(MODES)}.")

"""Fit an :class:`~rsd.tokenizer.RFSQTokenizer` on normalized action chunks and report what it learned.

Axis letters (docs/design.md): N chunks · B batch · C chunk steps · A action dims · H latent dims ·
L residual layers · G levels.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from tqdm.auto import tqdm

from rsd.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from rsd.tokenizer import RFSQTokenizer

__all__ = ["SplitMetrics", "TokenizerFitReport", "fit_tokenizer", "smooth_trajectories"]

EVAL_BATCH = 4096  # chunks per evaluation batch (bounds memory of the [B, C, H, L] codes)

# records


@dataclass(frozen=True)
class SplitMetrics:
    """Reconstruction and code usage of a tokenizer on one set of chunks (MSE in normalized units)."""

    num_chunks: int
    mse: float  # mean over all N*C*A entries, decoding all L layers
    mse_per_dim: tuple[float, ...]  # [A]
    mse_by_layers: tuple[float, ...]  # [L]: entry k-1 decodes the first k layers only
    levels_used: tuple[int, ...]  # [L]: distinct levels used in each layer
    usage: tuple[tuple[float, ...], ...]  # [L, G]: fraction of the layer's N*C*H tokens at each level


@dataclass(frozen=True)
class TokenizerFitReport:
    """What :func:`fit_tokenizer` did and how well the tokenizer reconstructs (``to_dict()`` is JSON-able)."""

    train: SplitMetrics
    val: SplitMetrics | None
    steps: int
    batch_size: int
    lr: float
    seed: int
    wall_seconds: float  # the optimisation loop only (evaluation excluded)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# helper functions


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _as_chunks(chunks: Any, tokenizer: RFSQTokenizer, name: str) -> torch.Tensor:
    """Tensor or array ``[N, C, A]`` -> float tensor on the tokenizer's device and dtype (validated)."""
    if isinstance(chunks, np.ndarray):
        if not np.issubdtype(chunks.dtype, np.floating):
            raise DTypeError(f"`{name}` must hold floats (normalized actions), got numpy {chunks.dtype}.")
        chunks = torch.from_numpy(np.ascontiguousarray(chunks))
    if not isinstance(chunks, torch.Tensor):
        raise ShapeError(f"`{name}` must be a torch.Tensor or numpy array [N, C, A], got {type(chunks).__name__}.")
    if not chunks.dtype.is_floating_point:
        raise DTypeError(f"`{name}` must hold floats (normalized actions), got {chunks.dtype}.")
    expected = (tokenizer.chunk_len, tokenizer.action_dim)
    if chunks.ndim != 3 or tuple(chunks.shape[1:]) != expected or chunks.shape[0] == 0:
        raise ShapeError(f"`{name}` must be [N, C, A] = [N >= 1, {expected[0]}, {expected[1]}] "
                         f"(the tokenizer's C and A), got shape {tuple(chunks.shape)}.")
    if not bool(torch.isfinite(chunks).all()):
        raise NonFiniteError(f"`{name}` has {int((~torch.isfinite(chunks)).sum())} NaN/inf entries; "
                             f"clean the data before fitting.")
    return chunks.to(device=tokenizer.scales.device, dtype=tokenizer.scales.dtype)


@torch.no_grad()
def _evaluate(tokenizer: RFSQTokenizer, chunks: torch.Tensor) -> SplitMetrics:
    """Metrics of ``tokenizer`` on ``chunks`` ``[N, C, A]`` (eval mode, batched)."""
    L, G, A = tokenizer.num_layers, tokenizer.num_levels, tokenizer.action_dim
    sq_err = torch.zeros(L, A, dtype=torch.float64)  # [L, A] summed squared error with k = 1..L layers
    counts = torch.zeros(L, G, dtype=torch.int64)  # [L, G]
    for start in range(0, chunks.shape[0], EVAL_BATCH):
        batch = chunks[start:start + EVAL_BATCH]  # [B, C, A]
        codes = tokenizer.encode(batch)  # [B, C, H, L]
        for k in range(1, L + 1):
            err = (tokenizer.decode_from_indices(codes, num_layers=k) - batch).double().pow(2)
            sq_err[k - 1] += reduce(err, "b c a -> a", "sum").cpu()
        counts += reduce(F.one_hot(codes, G), "b c h l g -> l g", "sum").cpu()
    n = chunks.shape[0] * tokenizer.chunk_len  # entries per action dim
    per_dim = sq_err[-1] / n
    usage = counts.double() / counts.sum(dim=1, keepdim=True)
    return SplitMetrics(
        num_chunks=int(chunks.shape[0]),
        mse=float(per_dim.mean()),
        mse_per_dim=tuple(float(v) for v in per_dim),
        mse_by_layers=tuple(float(v) for v in sq_err.sum(dim=1) / (n * A)),
        levels_used=tuple(int(v) for v in (counts > 0).sum(dim=1)),
        usage=tuple(tuple(float(v) for v in row) for row in usage),
    )


# main functions


def fit_tokenizer(
    tokenizer: RFSQTokenizer,
    chunks: torch.Tensor | np.ndarray,
    *,
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 3e-3,
    val_chunks: torch.Tensor | np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TokenizerFitReport:
    """Train ``tokenizer`` in place to reconstruct normalized action chunks; return a report.

    Args:
        tokenizer: the :class:`RFSQTokenizer` to train (its weights are updated; left in eval mode).
        chunks: normalized action chunks ``[N, C, A]`` (torch tensor or numpy array, finite floats).
        steps: optimisation steps (0 only evaluates). Each step draws ``batch_size`` chunks uniformly
            with replacement (``torch.Generator`` seeded with ``seed``).
        lr: Adam learning rate, cosine-annealed to ``lr / 10`` over ``steps``.
        val_chunks: optional held-out chunks ``[N', C, A]`` for ``report.val``.
        progress: show a tqdm bar with the running loss.

    Loss: ``MSE(reconstruction, chunks)`` through the straight-through quantizer (the forward pass
    decodes exactly what ``decode_from_indices(encode(chunks))`` decodes).
    """
    if not isinstance(tokenizer, RFSQTokenizer):
        raise ConfigError(f"`tokenizer` must be an RFSQTokenizer, got {type(tokenizer).__name__}.")
    steps = _positive_int(steps, "steps", minimum=0)
    batch_size = _positive_int(batch_size, "batch_size")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"`lr` must be a finite float > 0, got {lr!r}.")
    train = _as_chunks(chunks, tokenizer, "chunks")
    val = None if val_chunks is None else _as_chunks(val_chunks, tokenizer, "val_chunks")

    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1), eta_min=lr / 10)
    tokenizer.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="fit tokenizer", disable=not progress, leave=False)
    for step in bar:
        index = torch.randint(train.shape[0], (batch_size,), generator=generator).to(train.device)
        batch = train[index]  # [B, C, A]
        try:
            reconstruction, _ = tokenizer(batch)
        except NonFiniteError as err:  # the weights went non-finite in an earlier step
            raise NonFiniteError(f"training diverged before step {step}; lower `lr` (now {lr}). {err}") from err
        loss = F.mse_loss(reconstruction, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps - 1:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteError(f"tokenizer loss became {value} at step {step}; lower `lr` (now {lr}).")
            bar.set_postfix(mse=f"{value:.2e}")
    wall = time.perf_counter() - start
    tokenizer.eval()
    return TokenizerFitReport(
        train=_evaluate(tokenizer, train),
        val=None if val is None else _evaluate(tokenizer, val),
        steps=steps, batch_size=batch_size, lr=float(lr), seed=int(seed), wall_seconds=wall,
    )


def smooth_trajectories(n: int, chunk_len: int, action_dim: int, seed: int) -> torch.Tensor:
    """Synthetic normalized action chunks ``[n, chunk_len, action_dim]`` (float32, all in ``[-1, 1]``).

    Each chunk is a window (random start in ``[0, 100)`` steps) of a smooth trajectory: dims
    ``0..A-2`` are an offset plus 3 sinusoids with frequencies in ``[0.005, 0.08]`` cycles per step,
    random phases and amplitudes (offset + amplitudes <= 1); the last dim is a binary gripper (+-1)
    that flips at most once per chunk. Deterministic in ``seed``. For tests and benchmarks; real
    training data comes from recorded LIBERO demos.
    """
    n = _positive_int(n, "n")
    chunk_len = _positive_int(chunk_len, "chunk_len")
    action_dim = _positive_int(action_dim, "action_dim")
    g = torch.Generator().manual_seed(int(seed))

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)  # allowed: seeded synthetic data

    smooth_dims, components = action_dim - 1, 3  # A-1 smooth dims, K sinusoids each
    shape = (n, smooth_dims, components)
    start = uniform(n, high=100.0)  # [n]: where the window starts in its trajectory
    t = rearrange(start, "n -> n 1") + torch.arange(chunk_len, dtype=torch.float64)  # [n, C]
    freq = uniform(*shape, low=0.005, high=0.08)  # [n, A-1, K] cycles per step
    phase = uniform(*shape, high=2 * math.pi)
    amplitude = uniform(n, smooth_dims, low=0.2, high=0.9)  # [n, A-1]: sum of the K amplitudes
    weights = uniform(*shape)
    weights = weights / reduce(weights, "n a k -> n a 1", "sum") * rearrange(amplitude, "n a -> n a 1")
    offset = uniform(n, smooth_dims, low=-1.0, high=1.0) * (1.0 - amplitude)  # |offset| + amplitude <= 1
    angle = 2 * math.pi * rearrange(freq, "n a k -> n 1 a k") * rearrange(t, "n c -> n c 1 1") \
        + rearrange(phase, "n a k -> n 1 a k")  # [n, C, A-1, K]
    waves = torch.sin(angle) * rearrange(weights, "n a k -> n 1 a k")
    smooth = rearrange(offset, "n a -> n 1 a") + reduce(waves, "n c a k -> n c a", "sum")  # [n, C, A-1]

    start_open = uniform(n) < 0.5  # [n]
    flip_at = torch.randint(0, 2 * chunk_len, (n,), generator=g)  # [n]: flips inside the chunk when < C
    flipped = torch.arange(chunk_len) >= rearrange(flip_at, "n -> n 1")  # [n, C]
    gripper = torch.where(rearrange(start_open, "n -> n 1") ^ flipped, 1.0, -1.0).to(torch.float64)  # [n, C]
    out = torch.cat([smooth, rearrange(gripper, "n c -> n c 1")], dim=-1)  # [n, C, A]
    out = out.clamp(-1.0, 1.0)  # |values| <= 1 already; the clamp only absorbs float rounding
    return out.float()

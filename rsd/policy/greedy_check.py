"""Speculative codes checked against greedy decoding of the same hidden state (``rsd eval --check-greedy``).

``RSDPolicy(check_greedy=True)`` decodes every chunk speculatively, then also runs :func:`rsd.speculative.greedy_decode`
on the same hidden state and compares the codes (:func:`compare_with_greedy`):

- mode ``exact``: speculative decoding must give greedy's codes bit for bit (``rsd.speculative``'s contract); any
  difference raises :class:`rsd.errors.SpeculativeMismatchError`, so no action of a broken decoder is executed;
- modes ``relaxed`` / ``match_rate``: differences are what these rules allow; they are counted, not raised.

A batch (``RSDPolicy.predict_chunks``) is checked row by row (:func:`compare_rows_with_greedy`): each chunk's
record and error are those of the chunk alone. The result goes into the chunk's ``info["greedy_check"]``: ``{"chunks": 1, "codes_equal": bool, "tokens": int,
"tokens_differing": int}`` (tokens = ``C * H * L`` codes per chunk); its time into ``timing_ms["greedy_check_ms"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange

from rsd.errors import SpeculativeMismatchError
from rsd.speculative import greedy_decode

__all__ = ["compare_with_greedy", "compare_rows_with_greedy"]


def compare_with_greedy(head: torch.nn.Module, hidden: torch.Tensor, codes: torch.Tensor, mode: str) -> dict[str, Any]:
    """Greedy-decode ``hidden`` [B, D] with ``head`` and compare with the speculative ``codes`` [B, C, H, L].

    Returns ``{"chunks": B, "codes_equal": bool, "tokens": int, "tokens_differing": int}`` (one host sync).
    Raises :class:`SpeculativeMismatchError` when ``mode == "exact"`` and any code differs."""
    differs = _differs(head, hidden, codes)
    result = _record(differs, int(differs.sum()), mode)
    if isinstance(result, SpeculativeMismatchError):
        raise result
    return result


def compare_rows_with_greedy(head: torch.nn.Module, hidden: torch.Tensor, codes: torch.Tensor,
                             mode: str) -> list[dict[str, Any] | SpeculativeMismatchError]:
    """:func:`compare_with_greedy` per batch element, from one greedy decode of the batch (one host sync): for row
    ``i``, what ``compare_with_greedy(head, hidden[i:i+1], codes[i:i+1], mode)`` returns, or the error it raises."""
    differs = _differs(head, hidden, codes)
    counts = rearrange(differs, "b c h l -> b (c h l)").sum(dim=1).tolist()
    return [_record(differs[i: i + 1], int(n), mode) for i, n in enumerate(counts)]


def _differs(head: torch.nn.Module, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Where greedy decoding of ``hidden`` differs from ``codes`` (bool, the codes' shape)."""
    greedy = greedy_decode(head, hidden)
    if greedy.shape != codes.shape:
        raise SpeculativeMismatchError(f"speculative codes have shape {tuple(codes.shape)}, greedy decoding gives "
                                       f"{tuple(greedy.shape)}: the speculative decoder returns another layout.")
    return greedy != codes


def _record(differs: torch.Tensor, differing: int, mode: str) -> dict[str, Any] | SpeculativeMismatchError:
    """The check of the chunks in ``differs`` ([B, C, H, L], ``differing`` of them True), or (``exact`` with a
    difference) the error to raise, carrying that record as ``check``."""
    result = {"chunks": int(differs.shape[0]), "codes_equal": differing == 0, "tokens": int(differs.numel()),
              "tokens_differing": differing}
    if mode == "exact" and differing:
        layers = differs.flatten(0, -2).any(dim=0).nonzero().flatten().tolist()
        error = SpeculativeMismatchError(
            f"speculative decoding in 'exact' mode gave {differing} of {differs.numel()} codes that differ from "
            f"greedy decoding of the same hidden state (residual layers {layers}); exact speculative decoding must "
            f"equal greedy_decode bit for bit. Check the draft/verify logic in rsd.speculative (the accepted prefix, "
            f"the bonus layer, the rollout after it), or evaluate with --decode greedy until it is fixed.")
        error.check = result  # what rsd eval counts for the chunk it refused
        return error
    return result

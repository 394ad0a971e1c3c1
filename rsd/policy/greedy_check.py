"""Speculative codes checked against greedy decoding of the same hidden state (``rsd eval --check-greedy``).

``RSDPolicy(check_greedy=True)`` decodes every chunk speculatively, then also runs :func:`rsd.speculative.greedy_decode`
on the same hidden state and compares the codes (:func:`compare_with_greedy`):

- mode ``exact``: speculative decoding must give greedy's codes bit for bit (``rsd.speculative``'s contract); any
  difference raises :class:`rsd.errors.SpeculativeMismatchError`, so no action of a broken decoder is executed;
- modes ``relaxed`` / ``match_rate``: differences are what these rules allow; they are counted, not raised.

The result goes into the chunk's ``info["greedy_check"]``: ``{"chunks": 1, "codes_equal": bool, "tokens": int,
"tokens_differing": int}`` (tokens = ``C * H * L`` codes per chunk); its time into ``timing_ms["greedy_check_ms"]``.
"""

from __future__ import annotations

from typing import Any

import torch

from rsd.errors import SpeculativeMismatchError
from rsd.speculative import greedy_decode

__all__ = ["compare_with_greedy"]


def compare_with_greedy(head: torch.nn.Module, hidden: torch.Tensor, codes: torch.Tensor, mode: str) -> dict[str, Any]:
    """Greedy-decode ``hidden`` [B, D] with ``head`` and compare with the speculative ``codes`` [B, C, H, L].

    Returns ``{"chunks": B, "codes_equal": bool, "tokens": int, "tokens_differing": int}`` (one host sync).
    Raises :class:`SpeculativeMismatchError` when ``mode == "exact"`` and any code differs."""
    greedy = greedy_decode(head, hidden)
    if greedy.shape != codes.shape:
        raise SpeculativeMismatchError(f"speculative codes have shape {tuple(codes.shape)}, greedy decoding gives "
                                       f"{tuple(greedy.shape)}: the speculative decoder returns another layout.")
    differing = int((greedy != codes).sum())
    result = {"chunks": int(codes.shape[0]), "codes_equal": differing == 0, "tokens": int(codes.numel()),
              "tokens_differing": differing}
    if mode == "exact" and differing:
        layers = (greedy != codes).flatten(0, -2).any(dim=0).nonzero().flatten().tolist()
        error = SpeculativeMismatchError(
            f"speculative decoding in 'exact' mode gave {differing} of {codes.numel()} codes that differ from greedy "
            f"decoding of the same hidden state (residual layers {layers}); exact speculative decoding must equal "
            f"greedy_decode bit for bit. Check the draft/verify logic in rsd.speculative (the accepted prefix, the "
            f"bonus layer, the rollout after it), or evaluate with --decode greedy until it is fixed.")
        error.check = result  # what rsd eval counts for the chunk it refused
        raise error
    return result

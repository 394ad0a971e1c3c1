"""Greedy and speculative decoding of RFSQ codes from a hidden state.

Speculative decoding over residual layers (the draft -> verify step, after Leviathan et al., "Fast
Inference from Transformers via Speculative Decoding", arXiv 2211.17192, with greedy acceptance):

1. the draft proposes layers ``0..k-1`` in one pass (argmax);
2. one main pass, :meth:`RFSQHead.teacher_forced` on the draft codes, gives the main argmax of layers
   ``0..k`` (layer ``l`` conditioned on the draft's layers ``< l``);
3. per batch element, the longest prefix of draft layers passing the acceptance rule is kept; the main
   code at the first rejected layer (or at layer ``k`` when all ``k`` pass and ``k < L``) is conditioned
   on exactly that prefix, so it is kept too (the "bonus" layer);
4. the main head decodes the remaining layers one by one, batched (:meth:`RFSQHead.rollout` with the known
   codes as its prefix); elements that are further along keep their codes.

Acceptance rules (``mode``), per layer, over its ``C*H`` tokens:

- ``exact``      every token equals the main argmax. The result equals :func:`greedy_decode` bit for
                 bit (the teacher-forced logits are bitwise equal to the incremental ones, see
                 ``rsd/heads.py``).
- ``relaxed``    every token is within ``threshold`` levels of the main argmax (SpecVLA's rule for
                 ordinal action tokens); ``threshold`` an int ``>= 0``. Accepted layers keep the draft codes.
- ``match_rate`` the fraction of equal tokens is ``>= threshold`` (a coarse match-rate rule; default 0.7; docs/failure-modes.md).

Checks: the hidden state's values are not read here (the policy checks them once, where the backbone hands
them over: ``rsd.backbones.check_hidden``); the heads check its layout. The logits of both heads are checked
for NaN/inf, one host sync per check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from einops import rearrange, reduce

from rsd.errors import ConfigError, NonFiniteError, ShapeError
from rsd.heads import DraftHead, RFSQHead
from rsd.layout import layers_to_codes

__all__ = ["MODES", "SpecStats", "SpeculativeDecoder", "greedy_decode"]

MODES = ("exact", "relaxed", "match_rate")
DEFAULT_MATCH_RATE = 0.7  # the match-rate rule's usual threshold (docs/failure-modes.md)


# helper functions


def _check_finite(**logits: torch.Tensor) -> None:
    """Raise NonFiniteError naming the head whose logits contain NaN/inf (one host sync when all is well)."""
    flags = [torch.isfinite(x).all() for x in logits.values()]
    if not bool(torch.stack(flags).all()):
        bad = [who for who, ok in zip(logits, flags) if not bool(ok)]
        raise NonFiniteError(f"NaN/inf logits from {', '.join(bad)}: check its weights (the checkpoint) and the "
                             f"hidden state fed to it (rsd.backbones.check_hidden checks one).")


# public API


def greedy_decode(main: RFSQHead, hidden: torch.Tensor) -> torch.Tensor:
    """Main head only, layer by layer (L sequential steps): ``hidden`` [B, D] -> codes ``[B, C, H, L]``
    int64 in ``[0, G)`` (the decoder layout)."""
    if not isinstance(main, RFSQHead):
        raise ConfigError(f"`main` must be an RFSQHead, got {type(main).__name__}.")
    with torch.inference_mode():
        layers, logits = main.rollout(main.start(hidden))  # [B, L, C, H], [B, L, C, H, G]
        _check_finite(main_head=logits)
        return layers_to_codes(layers)


@dataclass(frozen=True)
class SpecStats:
    """What one :meth:`SpeculativeDecoder.decode` call did, computed from the tokens.

    - ``accepted_layers``   per element, the number of draft layers accepted (``0..k``)
    - ``acceptance_rate``   per draft layer ``l``: fraction of elements whose accepted prefix includes ``l``
    - ``token_match_rate``  per draft layer ``l``: fraction of the batch's draft tokens equal to the main
                            argmax (the main conditioned on the draft's layers ``< l``)
    - ``main_steps``        sequential main-head calls (the verify pass counts 1)
    - ``draft_steps``       draft calls (1)
    - ``greedy_steps``      main-head calls greedy decoding makes (``L``), for comparison

    :meth:`row` gives element ``i``'s own statistics, those ``decode`` of that element alone reports (its main
    steps are what it alone needs: the batch runs as many as its furthest-behind element).
    """

    mode: str
    threshold: float | int | None
    accepted_layers: tuple[int, ...]
    acceptance_rate: tuple[float, ...]
    token_match_rate: tuple[float, ...]
    main_steps: int
    draft_steps: int
    greedy_steps: int
    # per element, per draft layer: the fraction of its draft tokens equal to the main argmax (for row())
    row_token_match_rate: tuple[tuple[float, ...], ...] = field(default=(), repr=False, compare=False)

    @property
    def mean_accepted_layers(self) -> float:
        return sum(self.accepted_layers) / len(self.accepted_layers)

    def row(self, i: int) -> "SpecStats":
        """The statistics of batch element ``i`` alone (equal to this object's for a batch of one)."""
        if not 0 <= i < len(self.accepted_layers) or len(self.row_token_match_rate) != len(self.accepted_layers):
            raise ShapeError(f"SpecStats.row({i}): these statistics hold {len(self.accepted_layers)} elements "
                             f"and {len(self.row_token_match_rate)} rows of token match rates.")
        accepted, k, L = self.accepted_layers[i], len(self.acceptance_rate), self.greedy_steps
        return SpecStats(mode=self.mode, threshold=self.threshold, accepted_layers=(accepted,),
                         acceptance_rate=tuple(float(layer < accepted) for layer in range(k)),
                         token_match_rate=self.row_token_match_rate[i],
                         main_steps=1 + (L - min(accepted + 1, L)), draft_steps=self.draft_steps, greedy_steps=L,
                         row_token_match_rate=(self.row_token_match_rate[i],))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (lists, ints, floats, str, None)."""
        data = asdict(self)
        del data["row_token_match_rate"]
        for key in ("accepted_layers", "acceptance_rate", "token_match_rate"):
            data[key] = list(data[key])
        data["mean_accepted_layers"] = self.mean_accepted_layers
        return data


class SpeculativeDecoder:
    """Draft proposes, main verifies (see the module docstring).

    ``decode(hidden [B, D]) -> (codes [B, C, H, L] int64, SpecStats)``. Each batch element is judged
    on its own. ``mode`` one of :data:`MODES`; ``threshold``: ``exact`` none, ``relaxed`` an int
    ``>= 0`` (levels), ``match_rate`` a fraction in ``[0, 1]`` (default 0.7).
    """

    def __init__(
        self, draft: DraftHead, main: RFSQHead, mode: str = "exact", threshold: float | int | None = None
    ) -> None:
        if not isinstance(draft, DraftHead):
            raise ConfigError(f"`draft` must be a DraftHead, got {type(draft).__name__}.")
        if not isinstance(main, RFSQHead):
            raise ConfigError(f"`main` must be an RFSQHead, got {type(main).__name__}.")
        shared = ("chunk_len", "latent_dim", "num_layers", "num_levels", "hidden_dim")
        diff = {f: (getattr(draft.cfg, f), getattr(main.cfg, f)) for f in shared}
        diff = {f: pair for f, pair in diff.items() if pair[0] != pair[1]}
        if diff:
            raise ConfigError(
                f"draft and main configs disagree on {diff} (draft, main): build both from one RSDConfig."
            )
        self.draft, self.main = draft, main
        self.mode, self.threshold = mode, self._resolve_threshold(mode, threshold)

    @staticmethod
    def _resolve_threshold(mode: str, threshold: Any) -> float | int | None:
        if mode == "exact":
            if threshold is not None:
                raise ConfigError(f"mode 'exact' takes no threshold, got threshold={threshold!r}.")
            return None
        if mode == "relaxed":
            if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
                raise ConfigError(
                    f"mode 'relaxed' needs `threshold`: an int >= 0 (max |draft - main| in levels), got {threshold!r}."
                )
            return threshold
        if mode == "match_rate":
            if threshold is None:
                return DEFAULT_MATCH_RATE
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
                raise ConfigError(
                    f"mode 'match_rate' needs `threshold` in [0, 1] (fraction of equal tokens), got {threshold!r}."
                )
            return float(threshold)
        raise ConfigError(f"unknown speculative mode {mode!r}; choose one of {', '.join(MODES)}.")

    def _passes(self, draft: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        """Acceptance rule per layer: ``draft``, ``main`` [B, k, C, H] -> [B, k] bool."""
        if self.mode == "exact":
            return reduce(draft == main, "b k c h -> b k", "min")
        if self.mode == "relaxed":
            return reduce((draft - main).abs() <= self.threshold, "b k c h -> b k", "min")
        # float64: the mean of 0/1 values is the correctly rounded count / (C*H), compared with the Python
        # float threshold itself, so a rate equal to the threshold as a fraction (7/10 vs 0.7) passes
        return reduce((draft == main).double(), "b k c h -> b k", "mean") >= self.threshold

    def decode(self, hidden: torch.Tensor) -> tuple[torch.Tensor, SpecStats]:
        """``hidden`` [B, D] -> (codes ``[B, C, H, L]`` int64 in ``[0, G)``, :class:`SpecStats`)."""
        cfg, L = self.main.cfg, self.main.cfg.num_layers
        with torch.inference_mode():
            state = self.main.start(hidden)
            draft_logits = self.draft(hidden)  # [B, k, C, H, G]
            B, k = hidden.shape[0], self.draft.cfg.draft_layers
            expected = (B, k, cfg.chunk_len, cfg.latent_dim, cfg.num_levels)
            if tuple(draft_logits.shape) != expected:
                raise ShapeError(
                    f"the draft returned logits of shape {tuple(draft_logits.shape)}, "
                    f"expected [B, k, C, H, G] = {expected}."
                )
            draft = draft_logits.argmax(dim=-1)  # [B, k, C, H]

            # draft codes are argmaxes over G levels, of the checked shape: in range by construction
            verify_logits, states = self.main.teacher_forced(state, draft, validate=False, return_states=True)
            # verify_logits [B, n = min(k+1, L), C, H, G]; states[l] is the main head before layer l
            _check_finite(draft_head=draft_logits, main_head=verify_logits)
            verified = verify_logits.argmax(dim=-1)  # [B, n, C, H]
            n = verified.shape[1]

            passed = self._passes(draft, verified[:, :k])  # [B, k]
            accepted = passed.long().cumprod(dim=1).sum(dim=1)  # [B], 0..k
            known_layers = torch.clamp(accepted + 1, max=L)  # accepted prefix + the bonus layer

            # accepted layers keep the draft codes (== main in `exact`), the rest come from the main head
            position = torch.arange(n, device=hidden.device)
            from_draft = rearrange(position[:k] < rearrange(accepted, "b -> b 1"), "b k -> b k 1 1")  # [B, k, 1, 1]
            known = torch.cat([torch.where(from_draft, draft, verified[:, :k]), verified[:, k:]], dim=1)
            if n < L:  # pad to L layers; rows past `known_layers` are ignored by the rollout
                pad = known.new_zeros(B, L - n, cfg.chunk_len, cfg.latent_dim)
                known = torch.cat([known, pad], dim=1)  # [B, L, C, H]

            # Every element knows layers < start; layers < start - 1 are accepted draft layers for all of
            # them, so the verify pass's state before layer start - 1 is the greedy one: advance once.
            start = int(known_layers.min())  # 1..L
            if start < L:
                state = self.main.advance(states[start - 1], known[:, start - 1], validate=False)
                layers, logits = self.main.rollout(state, known, known_layers, validate=False)  # [B, L, C, H]
                _check_finite(main_head=logits)
            else:
                layers = known

            includes = (position[:k] < rearrange(accepted, "b -> b 1")).double()  # [B, k]
            matches = (draft == verified[:, :k]).double()  # [B, k, C, H]
            stats = SpecStats(
                mode=self.mode,
                threshold=self.threshold,
                accepted_layers=tuple(accepted.tolist()),
                acceptance_rate=tuple(reduce(includes, "b k -> k", "mean").tolist()),
                token_match_rate=tuple(reduce(matches, "b k c h -> k", "mean").tolist()),
                main_steps=1 + (L - start),
                draft_steps=1,
                greedy_steps=L,
                row_token_match_rate=tuple(map(tuple, reduce(matches, "b k c h -> b k", "mean").tolist())),
            )
            return layers_to_codes(layers), stats

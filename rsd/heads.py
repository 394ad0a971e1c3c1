"""Heads: hidden state ``[B, D]`` -> RFSQ token logits (main and draft) or actions (L1 baseline).

- :class:`RFSQHead` the main head, causal over residual layers: layer ``l`` sees the hidden state and the
  codes of layers ``< l``. Teacher-forced in one call (:meth:`RFSQHead.logits_given_prefix`), one cheap
  step per layer (:meth:`RFSQHead.start` / :meth:`RFSQHead.step` / :meth:`RFSQHead.advance`), or the greedy
  rollout (:meth:`RFSQHead.rollout`): the one greedy loop of rsd, used by ``forward``, by
  ``rsd.speculative`` (greedy decoding, and the layers after an accepted draft prefix) and by the CUDA graph
  of ``rsd.fastpath``.
- :class:`DraftHead` the non-autoregressive draft: the first ``k`` layers in one pass.
- :class:`L1ActionHead` the L1-regression baseline (OpenVLA-OFT style): hidden -> actions.

Axis letters: B batch, D hidden, W head width, L layers, P prefix layers, n output layers, C chunk steps,
H latent dims, G levels, k draft layers, A action dims.

What the heads check: the hidden state's type, dtype and shape, on the host (no tensor value is read, so no
host sync and nothing a CUDA graph cannot hold). Its values (finite, not dead) are the policy's one check at
the backbone boundary (``rsd.backbones.base.check_hidden``), never repeated here. Codes passed in are
checked for dtype, shape and range ``[0, G)`` (the range read is one host sync); ``validate=False`` skips
every check for codes that are in range by construction (argmax outputs), as ``rsd.speculative`` and
``rsd.fastpath`` pass them.

Exactness (what ``exact`` speculative decoding relies on): the teacher-forced logits are bitwise equal to
the incremental ones for the same prefix, on any device, by construction: both paths call the same
per-layer function on ``[B, W]`` tensors and build the layer context with the same sequential float adds.
Folding the layers into the rows of one ``[n*B, W]`` matmul would not be: on the dev CPU (MKL) a ``Linear``
rounds ``M <= 3`` rows differently from ``M >= 4`` rows (measured), which flips the argmax at near-ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
from einops import rearrange, reduce
from torch import nn

from rsd.config import RSDConfig
from rsd.errors import CodeRangeError, DTypeError, ShapeError

__all__ = ["HeadState", "RFSQHead", "DraftHead", "L1ActionHead"]


# helper functions


def _check_hidden_layout(hidden: torch.Tensor, cfg: RSDConfig, dtype: torch.dtype) -> None:
    """``hidden`` must be a float tensor ``[B, D]`` in the head's dtype. Reads no value (no host sync)."""
    if not isinstance(hidden, torch.Tensor):
        raise DTypeError(f"`hidden` must be a torch.Tensor [B, D], got {type(hidden).__name__}.")
    if not hidden.dtype.is_floating_point:
        raise DTypeError(f"`hidden` must be floating point [B, D], got {hidden.dtype}.")
    if hidden.ndim != 2 or hidden.shape[1] != cfg.hidden_dim or hidden.shape[0] < 1:
        raise ShapeError(
            f"`hidden` must be [B, D] with B >= 1 and D = hidden_dim = {cfg.hidden_dim}, got shape "
            f"{tuple(hidden.shape)}. Pass the backbone's last-token hidden state (one row per sample)."
        )
    if hidden.dtype != dtype:
        raise DTypeError(
            f"`hidden` is {hidden.dtype} but the head's weights are {dtype}; cast with `hidden.to({dtype})`."
        )


def _check_codes(codes: torch.Tensor, name: str, axes: str, shape: tuple[int, ...], num_levels: int) -> None:
    """``codes`` must be an int64 tensor of ``shape`` (``-1`` = any size) with values in ``[0, G)``."""
    if not isinstance(codes, torch.Tensor):
        raise DTypeError(f"`{name}` must be a torch.Tensor {axes}, got {type(codes).__name__}.")
    if codes.dtype != torch.int64:
        raise DTypeError(f"`{name}` must be int64 codes {axes}, got {codes.dtype}.")
    if codes.ndim != len(shape) or any(e != -1 and a != e for a, e in zip(codes.shape, shape)):
        expected = ", ".join("*" if e == -1 else str(e) for e in shape)
        raise ShapeError(f"`{name}` must be {axes} = [{expected}], got shape {tuple(codes.shape)}.")
    if codes.numel() and (codes.min() < 0 or codes.max() >= num_levels):
        raise CodeRangeError(
            f"`{name}` must lie in [0, {num_levels}) (G = num_levels), got values in "
            f"[{int(codes.min())}, {int(codes.max())}]."
        )


# main class


@dataclass(frozen=True)
class HeadState:
    """Incremental decoding state of :class:`RFSQHead`, positioned before layer ``layer``.

    ``base``    [B, W]  ``mlp_in(trunk(hidden))``, computed once by :meth:`RFSQHead.start`
    ``context`` [B, W]  sum of the code embeddings of layers ``< layer``
    ``layer``   int     the next layer to predict, ``0 <= layer <= L``
    """

    base: torch.Tensor
    context: torch.Tensor
    layer: int


class RFSQHead(nn.Module):
    """The main RFSQ head: ``p(codes of layer l | hidden, codes of layers < l)``.

    Architecture (W = ``cfg.head_width``):

    - trunk ``Linear(D, W) -> GELU`` on the hidden state;
    - output MLP, shared by all layers: ``mlp_in = Linear(W, W) -> LayerNorm -> ReLU -> out = Linear(W, C*H*G)``,
      rearranged ``(c h g)`` to ``[C, H, G]``. The layer embedding ``[L, W]`` and the code context enter
      after its first ``Linear``, i.e. in its hidden space: a linear map of a sum is the sum of the mapped
      terms, so this is the same function class as adding them before the ``Linear``, but the ``W x W``
      matmul runs once per sample (``base``) instead of once per layer;
    - code embeddings: one row per (layer, c, h, level) in a table ``Embedding(L*C*H*G, W)``;
      the codes of a layer embed as the sum over ``(c, h)`` of row ``l*C*H*G + (c*H + h)*G + code``
      (a gather and a sum, which ``torch.compile`` fuses into the next layer's norm; on an H200 the two
      kernels take 5.8 us per layer against 15.8 us for ``EmbeddingBag``'s bag kernel, docs/gpu.md);
      ``context_l`` is the sum of the embeddings of layers ``< l`` (causal).

    Layer ``l``'s logits: ``out(relu(norm(base + layer_embedding[l] + context_l)))`` with
    ``base = mlp_in(trunk(hidden))``. Greedy decoding runs the trunk once, then per layer one
    ``W -> C*H*G`` matmul and one gather + sum.

    :meth:`logits_given_prefix` is one call with no feedback between layers (all its inputs are known);
    it evaluates the layers one after another with exactly the ops of :meth:`step` / :meth:`advance`.
    """

    def __init__(self, cfg: RSDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, H, L, G, W = cfg.chunk_len, cfg.latent_dim, cfg.num_layers, cfg.num_levels, cfg.head_width
        self.trunk = nn.Sequential(nn.Linear(cfg.hidden_dim, W), nn.GELU())
        self.mlp_in = nn.Linear(W, W)  # the output MLP's first Linear, applied to the trunk features only
        self.code_embedding = nn.Embedding(L * C * H * G, W)
        self.layer_embedding = nn.Embedding(L, W)
        self.norm = nn.LayerNorm(W)
        self.out = nn.Linear(W, C * H * G)
        # Row offset of (layer l, step c, dim h) in the code table: l*C*H*G + (c*H + h)*G. Derived state.
        offsets = torch.arange(L * C * H, dtype=torch.int64) * G
        self.register_buffer("code_offsets", rearrange(offsets, "(l ch) -> l ch", l=L), persistent=False)
        # Small embeddings: a layer's embedding sums C*H rows, and nn.Embedding's N(0, 1) would swamp `base`.
        nn.init.normal_(self.code_embedding.weight, std=0.02)
        nn.init.normal_(self.layer_embedding.weight, std=0.02)

    # -- incremental API ------------------------------------------------------------------------

    def check_hidden_layout(self, hidden: torch.Tensor) -> None:
        """What :meth:`start` checks: ``hidden`` is a float tensor ``[B, D]`` in the head's dtype (DTypeError /
        ShapeError). Reads no value (no host sync), so a caller that replays a captured graph checks here."""
        _check_hidden_layout(hidden, self.cfg, self.trunk[0].weight.dtype)

    def start(self, hidden: torch.Tensor) -> HeadState:
        """``hidden`` [B, D] -> the state before layer 0: the trunk (and the MLP's first Linear) run once.

        Checks the layout only (:meth:`check_hidden_layout`); the values were checked at the backbone boundary.
        """
        self.check_hidden_layout(hidden)
        base = self.mlp_in(self.trunk(hidden))  # [B, W], in the output MLP's hidden space
        return HeadState(base=base, context=torch.zeros_like(base), layer=0)

    def step(self, state: HeadState) -> torch.Tensor:
        """Logits ``[B, C, H, G]`` of layer ``state.layer`` given the codes already advanced through."""
        self._check_state(state, need_layer=True)
        return self._layer_logits(state.base, state.context, state.layer)

    def advance(self, state: HeadState, codes: torch.Tensor, *, validate: bool = True) -> HeadState:
        """Feed the codes ``[B, C, H]`` (int64 in ``[0, G)``) of layer ``state.layer``; returns the next state.

        ``validate=False`` checks nothing (no host sync): for codes in range by construction (an argmax).
        """
        if validate:
            self._check_state(state, need_layer=True)
            B, cfg = state.base.shape[0], self.cfg
            _check_codes(codes, "codes", "[B, C, H]", (B, cfg.chunk_len, cfg.latent_dim), cfg.num_levels)
        context = self._next_context(state.context, codes, state.layer)
        return HeadState(base=state.base, context=context, layer=state.layer + 1)

    # -- one-call API ---------------------------------------------------------------------------

    def logits_given_prefix(self, hidden: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``hidden`` [B, D], ``prefix`` [B, P, C, H] int64 (``0 <= P <= L``) ->
        logits ``[B, min(P + 1, L), C, H, G]``; output layer ``l`` depends only on ``hidden`` and
        ``prefix[:, :l]``. ``prefix[:, L - 1]`` (when ``P = L``) conditions nothing."""
        return self.teacher_forced(self.start(hidden), prefix)

    @overload
    def teacher_forced(self, state: HeadState, prefix: torch.Tensor, *, validate: bool = ...,
                       return_states: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def teacher_forced(self, state: HeadState, prefix: torch.Tensor, *, validate: bool = ...,
                       return_states: Literal[True]) -> tuple[torch.Tensor, list[HeadState]]: ...

    def teacher_forced(self, state: HeadState, prefix: torch.Tensor, *, validate: bool = True,
                       return_states: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[HeadState]]:
        """:meth:`logits_given_prefix` from a fresh state of :meth:`start` (reuses its trunk output):
        ``prefix`` [B, P, C, H] -> logits ``[B, n, C, H, G]``, ``n = min(P + 1, L)``.

        Bitwise equal to :meth:`step` after :meth:`advance` through the same prefix. ``return_states``: also
        the n states it went through, ``states[l]`` positioned before output layer ``l`` (so a caller can
        continue from any of them). ``validate=False`` checks nothing (no host sync): for a prefix of argmax
        codes of the right shape.
        """
        if validate:
            self._check_state(state, need_layer=False)
            if state.layer != 0:
                raise ShapeError(
                    f"`teacher_forced` needs the state before layer 0 (from `start`), got layer {state.layer}."
                )
            cfg = self.cfg
            B, L = state.base.shape[0], cfg.num_layers
            if isinstance(prefix, torch.Tensor) and prefix.ndim == 4 and prefix.shape[1] > L:
                raise ShapeError(f"`prefix` has P = {prefix.shape[1]} layers but the head has only L = {L}.")
            _check_codes(prefix, "prefix", "[B, P, C, H]", (B, -1, cfg.chunk_len, cfg.latent_dim), cfg.num_levels)
        n = min(prefix.shape[1] + 1, self.cfg.num_layers)
        contexts, logits = [state.context], []
        for layer in range(n):  # the very ops of step/advance, layer by layer (see the module docstring)
            logits.append(self._layer_logits(state.base, contexts[layer], layer))
            if layer + 1 < n:
                contexts.append(self._next_context(contexts[layer], prefix[:, layer], layer))
        stacked = torch.stack(logits, dim=1)  # [B, n, C, H, G]
        if not return_states:
            return stacked
        return stacked, [HeadState(base=state.base, context=c, layer=layer) for layer, c in enumerate(contexts)]

    def rollout(self, state: HeadState, prefix: torch.Tensor | None = None, prefix_layers: torch.Tensor | None = None,
                *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy rollout from ``state`` (positioned before layer ``s = state.layer < L``) through layer ``L - 1``
        -> (codes ``[B, L, C, H]`` int64, logits ``[B, L - s, C, H, G]`` of layers ``s..L-1``).

        Each layer's codes are the argmax of its logits, fed to the next layer: one step per layer, no host sync
        (but the prefix checks below). ``head.rollout(head.start(hidden))`` is greedy decoding; :meth:`forward`
        returns its logits.

        ``prefix`` [B, P, C, H] int64 in ``[0, G)`` with ``s <= P <= L`` forces codes: element ``b`` keeps
        ``prefix[b, l]`` for ``l < prefix_layers[b]`` (``prefix_layers`` int64 ``[B]`` in ``[0, P]``, default
        ``P`` for all) instead of the argmax, and the layers after it follow the kept codes. The codes of
        layers ``< s`` are ``prefix[:, :s]``: the codes ``state`` was advanced through (the caller's word);
        ``s > 0`` needs a prefix. Checks: ``state``, and the prefix's dtype, shape and value ranges (one host
        sync); ``validate=False`` checks nothing: for codes in range by construction (argmax outputs).
        """
        L = self.cfg.num_layers
        if validate:
            self._check_state(state, need_layer=True)
            if prefix is not None or prefix_layers is not None or state.layer > 0:
                self._check_rollout_prefix(state, prefix, prefix_layers)
        layers = list(prefix[:, :state.layer].unbind(dim=1)) if prefix is not None else []  # s x [B, C, H]
        logits = []
        for layer in range(state.layer, L):
            layer_logits = self._layer_logits(state.base, state.context, layer)  # [B, C, H, G]
            logits.append(layer_logits)
            codes = layer_logits.argmax(dim=-1)  # [B, C, H]
            if prefix is not None and layer < prefix.shape[1] and prefix_layers is None:
                codes = prefix[:, layer]
            elif prefix is not None and layer < prefix.shape[1]:  # per element: keep prefix[b] below prefix_layers[b]
                codes = torch.where(rearrange(prefix_layers > layer, "b -> b 1 1"), prefix[:, layer], codes)
            layers.append(codes)
            if layer + 1 < L:
                state = HeadState(base=state.base, context=self._next_context(state.context, codes, layer),
                                  layer=layer + 1)
        return torch.stack(layers, dim=1), torch.stack(logits, dim=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy autoregressive rollout: ``hidden`` [B, D] -> logits ``[B, L, C, H, G]`` (layer ``l`` is
        conditioned on the argmax codes of layers ``< l``); :meth:`rollout` from :meth:`start`."""
        return self.rollout(self.start(hidden))[1]

    # -- internals ------------------------------------------------------------------------------

    def _next_context(self, context: torch.Tensor, codes: torch.Tensor, layer: int) -> torch.Tensor:
        """``context`` [B, W] + embedding of layer ``layer``'s ``codes`` [B, C, H]."""
        rows = rearrange(codes, "b c h -> b (c h)") + self.code_offsets[layer]  # [B, C*H] table rows
        return context + reduce(self.code_embedding(rows), "b n w -> b w", "sum")  # [B, C*H, W] -> [B, W]

    def _layer_logits(self, base: torch.Tensor, context: torch.Tensor, layer: int) -> torch.Tensor:
        """``base``, ``context`` [B, W] -> logits ``[B, C, H, G]`` of layer ``layer``."""
        z = base + self.layer_embedding.weight[layer] + context  # [B, W]
        flat = self.out(torch.relu(self.norm(z)))  # [B, C*H*G]
        return rearrange(flat, "b (c h g) -> b c h g", c=self.cfg.chunk_len, h=self.cfg.latent_dim)

    def _check_state(self, state: HeadState, need_layer: bool) -> None:
        if not isinstance(state, HeadState):
            raise DTypeError(f"`state` must be a HeadState from `start`, got {type(state).__name__}.")
        if need_layer and not 0 <= state.layer < self.cfg.num_layers:
            raise ShapeError(
                f"`state` is at layer {state.layer}; only layers 0..{self.cfg.num_layers - 1} can be stepped."
            )

    def _check_rollout_prefix(self, state: HeadState, prefix: torch.Tensor | None,
                              prefix_layers: torch.Tensor | None) -> None:
        """:meth:`rollout`'s prefix rules (one host sync for the value ranges)."""
        cfg, B, s = self.cfg, state.base.shape[0], state.layer
        if prefix is None and s > 0:
            raise ShapeError(f"`state` is at layer {s}: pass the `prefix` [B, P, C, H] (P >= {s}) it was advanced "
                             f"through, so the rollout can return the codes of layers < {s}.")
        if prefix is None:
            raise ShapeError("`prefix_layers` counts layers of `prefix`: pass `prefix` [B, P, C, H] with it, or neither.")
        _check_codes(prefix, "prefix", "[B, P, C, H]", (B, -1, cfg.chunk_len, cfg.latent_dim), cfg.num_levels)
        P = prefix.shape[1]
        if not s <= P <= cfg.num_layers:
            raise ShapeError(f"`prefix` has P = {P} layers; a rollout from layer {s} needs {s} <= P <= L = "
                             f"{cfg.num_layers}.")
        if prefix_layers is None:
            return
        if not isinstance(prefix_layers, torch.Tensor) or prefix_layers.dtype != torch.int64:
            raise DTypeError(f"`prefix_layers` must be an int64 tensor [B], got "
                             f"{getattr(prefix_layers, 'dtype', type(prefix_layers).__name__)}.")
        if tuple(prefix_layers.shape) != (B,):
            raise ShapeError(f"`prefix_layers` must be [B] = [{B}], got shape {tuple(prefix_layers.shape)}.")
        if bool(((prefix_layers < 0) | (prefix_layers > P)).any()):
            raise CodeRangeError(f"`prefix_layers` must lie in [0, P = {P}] (layers of `prefix` to keep), got "
                                 f"{prefix_layers.tolist()}.")


class DraftHead(nn.Module):
    """Non-autoregressive draft: ``hidden`` [B, D] -> logits ``[B, k, C, H, G]`` for layers ``0..k-1``.

    ``Linear(D, W) -> GELU`` (the ``4096 -> 512`` input projection is part of the checkpoint: docs/failure-modes.md),
    then LayerNorm, ``W -> W``, GELU, ``W -> k*C*H*G``.
    """

    def __init__(self, cfg: RSDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        W = cfg.head_width
        out = cfg.draft_layers * cfg.chunk_len * cfg.latent_dim * cfg.num_levels
        self.net = nn.Sequential(
            nn.Linear(cfg.hidden_dim, W), nn.GELU(),
            nn.LayerNorm(W), nn.Linear(W, W), nn.GELU(), nn.Linear(W, out),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, D] -> logits ``[B, k, C, H, G]``."""
        _check_hidden_layout(hidden, self.cfg, self.net[0].weight.dtype)
        cfg = self.cfg
        return rearrange(
            self.net(hidden), "b (k c h g) -> b k c h g", k=cfg.draft_layers, c=cfg.chunk_len, h=cfg.latent_dim
        )


class L1ActionHead(nn.Module):
    """L1-regression baseline (OpenVLA-OFT style): ``hidden`` [B, D] -> normalized actions ``[B, C, A]``.

    ``Linear(D, W) -> GELU -> LayerNorm -> Linear(W, W) -> GELU -> Linear(W, C*A)``. The output is not
    squashed (as in OFT): trained with L1 against BOUNDS_Q99-normalized targets in ``[-1, 1]``.
    """

    def __init__(self, cfg: RSDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        W = cfg.head_width
        self.net = nn.Sequential(
            nn.Linear(cfg.hidden_dim, W), nn.GELU(),
            nn.LayerNorm(W), nn.Linear(W, W), nn.GELU(), nn.Linear(W, cfg.chunk_len * cfg.action_dim),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, D] -> normalized actions ``[B, C, A]``."""
        _check_hidden_layout(hidden, self.cfg, self.net[0].weight.dtype)
        return rearrange(self.net(hidden), "b (c a) -> b c a", c=self.cfg.chunk_len)

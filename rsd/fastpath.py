"""CUDA-graph fast paths: the same kernels as eager PyTorch, replayed without per-kernel launch cost.

- :class:`CudaGraphFn` wraps a pure tensor function ``fn(*tensors) -> tensor | tuple of tensors`` and
  captures one CUDA graph per input signature (shapes, dtypes), e.g. one per prompt length of a
  backbone. A call copies the inputs into the graph's static buffers, replays it, and returns clones
  of the static outputs. The numbers are those of eager execution of the same kernels (the graph
  records them); the only difference is that the host no longer launches them one by one.
- :class:`GraphedRSDDecoder` captures heads (the trunk included) + argmax + layout + RFSQ decode
  (greedy, all L layers) as one graph: ``hidden [B, D] -> (codes [B, C, H, L], normalized actions
  [B, C, A])``. The checks that the eager path runs between kernels (each one a host sync, which a
  graph cannot contain) are computed inside the graph as flags and read once, with one host sync, after
  the replay: finite ``hidden``, finite actions, codes in ``[0, G)``. Shape and dtype of ``hidden`` are
  checked on the host before the replay (no sync).

Requirements of a captured function: no host synchronisation (``.item()``, ``bool(tensor)``, printing
tensors), no data-dependent shapes or Python control flow on tensor values, no CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange, reduce

from rsd.errors import CodeRangeError, ConfigError, DTypeError, NonFiniteError, ShapeError
from rsd.heads import HeadState, RFSQHead
from rsd.layout import layers_to_codes

__all__ = ["CudaGraphFn", "GraphedRSDDecoder", "greedy_rollout", "greedy_decode_with_flags"]


def _signature(args: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    return tuple((tuple(a.shape), a.dtype, a.device) for a in args)


class _Captured:
    """One graph with its static inputs and outputs."""

    def __init__(self, fn: Callable[..., Any], args: tuple[torch.Tensor, ...], warmup: int) -> None:
        self.inputs = tuple(a.clone() for a in args)
        stream = torch.cuda.Stream(device=args[0].device)
        stream.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(stream):  # warm-up on a side stream: cuBLAS/cuDNN handles, autotuning
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream(args[0].device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = fn(*self.inputs)
        self.single = isinstance(out, torch.Tensor)
        self.outputs = (out,) if self.single else tuple(out)
        if not all(isinstance(o, torch.Tensor) for o in self.outputs):
            raise ConfigError(f"a CUDA-graphed function must return tensors, got {[type(o).__name__ for o in self.outputs]}.")

    def __call__(self, args: tuple[torch.Tensor, ...]) -> Any:
        for static, arg in zip(self.inputs, args):
            static.copy_(arg, non_blocking=True)
        self.graph.replay()
        outs = tuple(o.clone() for o in self.outputs)  # the next replay overwrites the static outputs
        return outs[0] if self.single else outs


class CudaGraphFn:
    """``CudaGraphFn(fn)(*tensors)`` == ``fn(*tensors)``, replayed from a CUDA graph per input signature.

    Args:
        fn: a pure function of CUDA tensors (see the module docstring for what it may not do).
        device: the CUDA device the tensors live on (checked on every call).
        warmup: eager runs before capture.
        max_graphs: distinct input signatures kept (each graph holds its activations' memory).
    """

    def __init__(self, fn: Callable[..., Any], *, device: str | torch.device = "cuda", warmup: int = 2,
                 max_graphs: int = 16) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise ConfigError(f"the CUDA-graph fast path needs a CUDA device, got {self.device} "
                              f"(cuda available: {torch.cuda.is_available()}); use fast=False on CPU.")
        self.fn, self.warmup, self.max_graphs = fn, warmup, max_graphs
        self._graphs: dict[tuple[Any, ...], _Captured] = {}

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, *args: torch.Tensor) -> Any:
        if not args or not all(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args):
            raise ShapeError(f"CudaGraphFn takes CUDA tensors only, got {[getattr(a, 'device', type(a)) for a in args]}.")
        key = _signature(args)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                raise ConfigError(f"more than {self.max_graphs} distinct input shapes for one CUDA-graphed function; "
                                  f"raise max_graphs or bucket the inputs. Shapes so far: {list(self._graphs)}.")
            with torch.inference_mode():
                graph = self._graphs[key] = _Captured(self.fn, args, self.warmup)
        with torch.inference_mode():
            return graph(args)


class GraphedRSDDecoder:
    """Heads + argmax + layout + decode as one CUDA graph (greedy decoding of all ``L`` layers).

    ``decode(hidden [B, D]) -> (codes [B, C, H, L] int64, normalized actions [B, C, A])``, equal to
    ``greedy_decode(head, hidden)`` and ``tokenizer.decode_from_indices(codes)`` (the same ops in the same
    order; tested). The graph holds everything from ``hidden`` on (:func:`greedy_decode_with_flags`: the
    trunk of ``RFSQHead.start``, the L steps ``RFSQHead._step`` / ``_advance``, the layout change, the
    tokenizer's decode, and the validity flags); a call is one input copy, one replay and one host sync
    that reads the flags. ``compile=True`` also fuses each step's elementwise ops with inductor (fewer
    kernels); its argmax codes are those of the same float ops, but fused rounding may differ at exact
    logit ties. ``gather_context=True`` (meant with ``compile=True``) embeds each layer's codes as a
    gather + sum over the code table instead of ``EmbeddingBag`` (:func:`greedy_rollout`), which inductor
    fuses with the next layer's add + norm + ReLU; the sum runs in another order, so the same caveat holds.

    Raises (after the replay, before anything is returned): :class:`NonFiniteError` (``hidden`` or the
    actions contain NaN/inf), :class:`CodeRangeError` (a code outside ``[0, G)``); before it:
    :class:`DTypeError` / :class:`ShapeError` for a ``hidden`` that is not a float ``[B, D]`` tensor in
    the head's dtype.
    """

    def __init__(self, head: torch.nn.Module, tokenizer: torch.nn.Module, *, device: str | torch.device = "cuda",
                 compile: bool = False, gather_context: bool = False) -> None:
        if not isinstance(head, RFSQHead):
            raise ConfigError(f"GraphedRSDDecoder needs an RFSQHead, got {type(head).__name__}.")
        cfg = head.cfg
        tok = tokenizer.config
        if (tok["num_layers"], tok["num_levels"], tok["chunk_len"], tok["latent_dim"]) != (
                cfg.num_layers, cfg.num_levels, cfg.chunk_len, cfg.latent_dim):
            raise ConfigError(f"tokenizer {tok} and head config {cfg} disagree on L, G, C or H.")
        self.head, self.tokenizer, self.cfg = head, tokenizer, cfg
        self.gather_context = bool(gather_context)
        self._decode_fn = torch.compile(greedy_decode_with_flags, dynamic=False) if compile else greedy_decode_with_flags
        self._graph = CudaGraphFn(self._run, device=device)

    def _run(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._decode_fn(self.head, self.tokenizer, hidden, gather_context=self.gather_context)

    def decode(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_hidden_layout(hidden)
        codes, actions, flags = self._graph(hidden)
        hidden_finite, actions_finite, codes_in_range = flags.tolist()  # the one host sync
        if not hidden_finite:
            raise NonFiniteError("`hidden` contains NaN/inf: the backbone (or its dtype/autocast setup) is broken.")
        if not actions_finite:
            raise NonFiniteError("the graphed RSD decode produced NaN/inf actions: check the head and tokenizer weights.")
        if not codes_in_range:
            raise CodeRangeError(f"the graphed RSD decode produced codes outside [0, {self.cfg.num_levels}).")
        return codes, actions

    def _check_hidden_layout(self, hidden: torch.Tensor) -> None:
        """What ``RFSQHead.start`` checks on the host (type, dtype, shape); finiteness is a graph flag."""
        dtype = self.head.trunk[0].weight.dtype
        if not isinstance(hidden, torch.Tensor) or hidden.dtype != dtype:
            kind = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise DTypeError(f"`hidden` must be a {dtype} tensor [B, D] (the head's dtype), got {kind}; "
                             f"cast with `hidden.to({dtype})`.")
        if hidden.ndim != 2 or hidden.shape[0] < 1 or hidden.shape[1] != self.cfg.hidden_dim:
            raise ShapeError(f"`hidden` must be [B, D] with B >= 1 and D = hidden_dim = {self.cfg.hidden_dim}, "
                             f"got shape {tuple(hidden.shape)}.")


def greedy_decode_with_flags(head: torch.nn.Module, tokenizer: torch.nn.Module, hidden: torch.Tensor, *,
                             gather_context: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :class:`GraphedRSDDecoder` captures, without a single host sync: ``hidden`` [B, D] ->
    (codes ``[B, C, H, L]``, normalized actions ``[B, C, A]``, flags bool ``[3]`` = hidden finite,
    actions finite, codes in ``[0, G)``). ``RFSQHead.start`` without its checks, then
    :func:`greedy_rollout`."""
    base = head.mlp_in(head.trunk(hidden))  # RFSQHead.start: [B, W] in the output MLP's hidden space
    codes, actions = greedy_rollout(head, tokenizer, base, torch.zeros_like(base), gather_context=gather_context)
    in_range = ((codes >= 0) & (codes < head.cfg.num_levels)).all()
    flags = torch.stack([torch.isfinite(hidden).all(), torch.isfinite(actions).all(), in_range])
    return codes, actions, flags


def greedy_rollout(head: torch.nn.Module, tokenizer: torch.nn.Module, base: torch.Tensor, context: torch.Tensor, *,
                   gather_context: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """From the head state before layer 0 (``base``, ``context`` [B, W]) -> (codes ``[B, C, H, L]``,
    normalized actions ``[B, C, A]``), without a single host sync.

    ``gather_context``: add each layer's code embedding as ``table[rows].sum(over c h)`` (the rows
    ``RFSQHead._next_context`` bags) instead of through ``EmbeddingBag``: the same terms summed in
    another order (equal up to float rounding), in a form inductor fuses into one kernel."""
    L = head.cfg.num_layers
    state = HeadState(base=base, context=context, layer=0)
    layers = []
    for layer in range(L):
        codes = head._step(state).argmax(dim=-1)  # [B, C, H]
        layers.append(codes)
        if layer + 1 < L:
            if gather_context:
                rows = rearrange(codes, "b c h -> b (c h)") + head.code_offsets[layer]  # [B, C*H] table rows
                embedded = reduce(head.code_embedding.weight[rows], "b n w -> b w", "sum")  # [B, C*H, W] -> [B, W]
                state = HeadState(base=state.base, context=state.context + embedded, layer=state.layer + 1)
            else:
                state = head._advance(state, codes)
    codes = layers_to_codes(torch.stack(layers, dim=1))  # [B, L, C, H] -> [B, C, H, L]
    return codes, tokenizer.decoder(tokenizer._sum_layers(codes, L))  # decode_from_indices without its checks

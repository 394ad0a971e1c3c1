"""CUDA-graph fast paths: the same kernels as eager PyTorch, replayed without per-kernel launch cost.

- :class:`CudaGraphFn` wraps a pure tensor function ``fn(*tensors) -> tensor | tuple of tensors`` and
  captures one CUDA graph per input signature (shapes, dtypes), e.g. one per prompt length of a
  backbone. A call copies the inputs into the graph's static buffers, replays it, and returns clones
  of the static outputs. The numbers are those of eager execution of the same kernels (the graph
  records them); the only difference is that the host no longer launches them one by one.
- :class:`GraphedRSDDecoder` captures heads + argmax + layout + RFSQ decode (greedy, all L layers)
  as one graph: ``hidden [B, D] -> (codes [B, C, H, L], normalized actions [B, C, A])``. The checks
  that the eager path runs between kernels (each one a host sync, which a graph cannot contain) run
  once on the outputs instead: finite actions and codes in ``[0, G)``.

Requirements of a captured function: no host synchronisation (``.item()``, ``bool(tensor)``, printing
tensors), no data-dependent shapes or Python control flow on tensor values, no CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rsd.errors import CodeRangeError, ConfigError, NonFiniteError, ShapeError
from rsd.heads import HeadState, RFSQHead
from rsd.layout import layers_to_codes

__all__ = ["CudaGraphFn", "GraphedRSDDecoder", "greedy_rollout"]


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
    order; tested). ``RFSQHead.start`` runs eagerly first (it validates ``hidden``: one host sync); the
    graph holds the L steps (``RFSQHead._step`` / ``_advance``, the internals ``greedy_decode`` uses),
    the layout change and the tokenizer's decode; one more sync checks the outputs.
    """

    def __init__(self, head: torch.nn.Module, tokenizer: torch.nn.Module, *, device: str | torch.device = "cuda",
                 compile: bool = False) -> None:
        if not isinstance(head, RFSQHead):
            raise ConfigError(f"GraphedRSDDecoder needs an RFSQHead, got {type(head).__name__}.")
        cfg = head.cfg
        tok = tokenizer.config
        if (tok["num_layers"], tok["num_levels"], tok["chunk_len"], tok["latent_dim"]) != (
                cfg.num_layers, cfg.num_levels, cfg.chunk_len, cfg.latent_dim):
            raise ConfigError(f"tokenizer {tok} and head config {cfg} disagree on L, G, C or H.")
        self.head, self.tokenizer, self.cfg = head, tokenizer, cfg
        # compile: inductor fuses each step's elementwise ops (fewer kernels in the graph); the argmax
        # codes are those of the same float ops, but fused rounding may differ at exact logit ties
        self._rollout_fn = torch.compile(greedy_rollout, dynamic=False) if compile else greedy_rollout
        self._graph = CudaGraphFn(self._rollout, device=device)

    def _rollout(self, base: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rollout_fn(self.head, self.tokenizer, base, context)

    def decode(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.head.start(hidden)  # validates hidden (shape, dtype, finite)
        codes, actions = self._graph(state.base, state.context)
        bad_codes = (codes < 0) | (codes >= self.cfg.num_levels)
        finite, in_range = torch.stack([torch.isfinite(actions).all(), ~bad_codes.any()]).tolist()  # one sync
        if not finite:
            raise NonFiniteError("the graphed RSD decode produced NaN/inf actions: check the head and tokenizer weights.")
        if not in_range:
            raise CodeRangeError(f"the graphed RSD decode produced codes outside [0, {self.cfg.num_levels}).")
        return codes, actions


def greedy_rollout(head: torch.nn.Module, tokenizer: torch.nn.Module, base: torch.Tensor, context: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """What :class:`GraphedRSDDecoder` captures, without a single host sync: from the head state before
    layer 0 (``base``, ``context`` [B, W]) -> (codes ``[B, C, H, L]``, normalized actions ``[B, C, A]``)."""
    L = head.cfg.num_layers
    state = HeadState(base=base, context=context, layer=0)
    layers = []
    for layer in range(L):
        codes = head._step(state).argmax(dim=-1)  # [B, C, H]
        layers.append(codes)
        if layer + 1 < L:
            state = head._advance(state, codes)
    codes = layers_to_codes(torch.stack(layers, dim=1))  # [B, L, C, H] -> [B, C, H, L]
    return codes, tokenizer.decoder(tokenizer._sum_layers(codes, L))  # decode_from_indices without its checks

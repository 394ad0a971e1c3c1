"""CUDA-graph fast paths: the same kernels as eager PyTorch, replayed without per-kernel launch cost.

- :class:`CudaGraphFn` wraps a pure tensor function ``fn(*tensors) -> tensor | tuple of tensors`` and
  captures one CUDA graph per input signature (shapes, dtypes), e.g. one per prompt length of a
  backbone. A call copies the inputs into the graph's static buffers, replays it, and returns clones
  of the static outputs. The numbers are those of eager execution of the same kernels (the graph
  records them); the only difference is that the host no longer launches them one by one.
- :class:`GraphedRSDDecoder` captures heads (the trunk included) + argmax + layout + RFSQ decode
  (greedy, all L layers) as one graph: ``hidden [B, D] -> (codes [B, C, H, L], normalized actions
  [B, C, A])``, through the public pieces the eager path uses: ``RFSQHead.start``, ``RFSQHead.rollout``
  (the one greedy loop), ``layout.layers_to_codes`` and ``RFSQTokenizer.decode_from_indices(validate=False)``.
  The value checks of the eager path (each one a host sync, which a graph cannot contain) are computed
  inside the graph as flags and read once, with one host sync, after the replay: finite ``hidden``, finite
  actions, codes in ``[0, G)``. Shape and dtype of ``hidden`` are checked on the host before the replay
  (``RFSQHead.check_hidden_layout``, no sync). ``decode_to_host`` returns the same on the host after
  that one sync; ``compile=True`` fuses the graph's kernels (codes checked with :func:`argmax_regret`).

Requirements of a captured function: no host synchronisation (``.item()``, ``bool(tensor)``, printing
tensors), no data-dependent shapes or Python control flow on tensor values, no CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from einops import rearrange, reduce

from rsd.errors import CodeRangeError, ConfigError, NonFiniteError, ShapeError
from rsd.heads import HeadState, RFSQHead
from rsd.layout import codes_to_layers, layers_to_codes

__all__ = ["CudaGraphFn", "GraphedRSDDecoder", "argmax_regret", "greedy_rollout", "greedy_decode_with_flags",
           "greedy_decode_packed", "unpack_decoded"]


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

        self._host: tuple[torch.Tensor, ...] | None = None  # pinned mirrors of the outputs, made on first use

    def __call__(self, args: tuple[torch.Tensor, ...]) -> Any:
        self._replay(args)
        outs = tuple(o.clone() for o in self.outputs)  # the next replay overwrites the static outputs
        return outs[0] if self.single else outs

    def to_host(self, args: tuple[torch.Tensor, ...], output: int | None = None) -> Any:
        """Replay, copy the outputs (or only output ``output``) into pinned host memory behind it, one stream
        sync, host clones."""
        if self._host is None:
            self._host = tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in self.outputs)
        pick = range(len(self.outputs)) if output is None else [output]
        self._replay(args)
        for i in pick:
            self._host[i].copy_(self.outputs[i], non_blocking=True)
        torch.cuda.current_stream(self.outputs[0].device).synchronize()  # the one host sync
        outs = tuple(self._host[i].clone() for i in pick)  # the next call overwrites the pinned buffers
        return outs[0] if len(outs) == 1 else outs

    def _replay(self, args: tuple[torch.Tensor, ...]) -> None:
        for static, arg in zip(self.inputs, args):
            static.copy_(arg, non_blocking=True)
        self.graph.replay()


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
        """``fn(*args)``: CUDA tensors in, fresh CUDA tensors out (no host sync)."""
        graph = self._graph_for(args)
        with torch.inference_mode():
            return graph(args)

    def to_host(self, *args: torch.Tensor, output: int | None = None) -> Any:
        """``fn(*args)`` copied to the host (all outputs, or only output number ``output``): CPU tensors out,
        after one stream sync (the only one)."""
        graph = self._graph_for(args)
        with torch.inference_mode():
            return graph.to_host(args, output)

    def _graph_for(self, args: tuple[torch.Tensor, ...]) -> _Captured:
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
        return graph


class GraphedRSDDecoder:
    """Heads + argmax + layout + decode as one CUDA graph (greedy decoding of all ``L`` layers).

    ``decode(hidden [B, D]) -> (codes [B, C, H, L] int64, normalized actions [B, C, A])`` on the GPU, or
    :meth:`decode_to_host` for the same as CPU tensors. The graph holds everything from ``hidden`` on
    (:func:`greedy_decode_with_flags`: ``RFSQHead.start``, the L steps of ``RFSQHead.rollout``, the layout
    change, the tokenizer's unchecked decode, and the validity flags); a call is one input copy, one replay
    and one host sync that reads the flags.

    Equality with eager greedy decoding:

    - ``compile=False``: the same ops in the same order as ``greedy_decode(head, hidden)`` followed by
      ``tokenizer.decode_from_indices``: bit-equal codes and actions (tested).
    - ``compile=True``: inductor fuses each step's elementwise ops and reductions (about half the kernels).
      Fused kernels round differently, so an argmax may differ from eager's where two logits tie to float
      rounding, and a later layer then follows the other (equally likely) prefix. What holds, and what is
      tested and benchmarked with :func:`argmax_regret`: every code it emits is eager's argmax, up to a
      logit tie (the tests allow 1e-4), given the codes it emitted for the layers before. ``compile_mode`` is
      ``torch.compile``'s ``mode`` (e.g. ``"max-autotune-no-cudagraphs"``).

    Raises (after the replay, before anything is returned): :class:`NonFiniteError` (``hidden`` or the
    actions contain NaN/inf), :class:`CodeRangeError` (a code outside ``[0, G)``); before it:
    :class:`DTypeError` / :class:`ShapeError` for a ``hidden`` that is not a float ``[B, D]`` tensor in
    the head's dtype.
    """

    def __init__(self, head: torch.nn.Module, tokenizer: torch.nn.Module, *, device: str | torch.device = "cuda",
                 compile: bool = False, compile_mode: str | None = None) -> None:
        if not isinstance(head, RFSQHead):
            raise ConfigError(f"GraphedRSDDecoder needs an RFSQHead, got {type(head).__name__}.")
        cfg = head.cfg
        tok = tokenizer.config
        if (tok["num_layers"], tok["num_levels"], tok["chunk_len"], tok["latent_dim"], tok["action_dim"]) != (
                cfg.num_layers, cfg.num_levels, cfg.chunk_len, cfg.latent_dim, cfg.action_dim):
            raise ConfigError(f"tokenizer {tok} and head config {cfg} disagree on L, G, C, H or A.")
        if compile_mode is not None and not compile:
            raise ConfigError(f"compile_mode={compile_mode!r} applies to the compiled graph: pass compile=True too.")
        self.head, self.tokenizer, self.cfg = head, tokenizer, cfg
        self.compiled = bool(compile)
        self._decode_fn = (torch.compile(greedy_decode_packed, dynamic=False, mode=compile_mode) if compile
                           else greedy_decode_packed)
        self._graph = CudaGraphFn(self._run, device=device)

    def _run(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._decode_fn(self.head, self.tokenizer, hidden)

    def decode(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` [B, D] (CUDA) -> (codes ``[B, C, H, L]``, normalized actions ``[B, C, A]``), CUDA tensors."""
        self.head.check_hidden_layout(hidden)  # on the host: the replay runs no Python
        codes, actions, flags, _ = self._graph(hidden)
        self._raise_on_flags(flags.tolist())  # the one host sync
        return codes, actions

    def decode_to_host(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` with CPU results (codes int64, actions float32): the graph also packs codes,
        actions and flags into one vector, and only that vector goes to pinned memory behind the replay;
        the one stream sync waits for it."""
        self.head.check_hidden_layout(hidden)
        packed = self._graph.to_host(hidden, output=3).numpy()  # a fresh host copy; numpy from here (cheaper ops)
        codes, actions, flags = unpack_decoded(packed, hidden.shape[0], self.cfg)
        if not flags.all():
            self._raise_on_flags(flags.astype(bool).tolist())
        return torch.from_numpy(codes), torch.from_numpy(actions)

    def _raise_on_flags(self, flags: list[bool]) -> None:
        hidden_finite, actions_finite, codes_in_range = flags
        if not hidden_finite:
            raise NonFiniteError("`hidden` contains NaN/inf: the backbone (or its dtype/autocast setup) is broken.")
        if not actions_finite:
            raise NonFiniteError("the graphed RSD decode produced NaN/inf actions: check the head and tokenizer weights.")
        if not codes_in_range:
            raise CodeRangeError(f"the graphed RSD decode produced codes outside [0, {self.cfg.num_levels}).")


def greedy_decode_with_flags(head: torch.nn.Module, tokenizer: torch.nn.Module,
                             hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :class:`GraphedRSDDecoder` captures, without a single host sync: ``hidden`` [B, D] ->
    (codes ``[B, C, H, L]``, normalized actions ``[B, C, A]``, flags bool ``[3]`` = hidden finite,
    actions finite, codes in ``[0, G)``). ``RFSQHead.start`` (layout checks on the host only), then
    :func:`greedy_rollout`."""
    state = head.start(hidden)  # [B, W] trunk output, in the output MLP's hidden space
    codes, actions = greedy_rollout(head, tokenizer, state.base, state.context)
    in_range = ((codes >= 0) & (codes < head.cfg.num_levels)).all()
    flags = torch.stack([torch.isfinite(hidden).all(), torch.isfinite(actions).all(), in_range])
    return codes, actions, flags


def greedy_decode_packed(head: torch.nn.Module, tokenizer: torch.nn.Module, hidden: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`greedy_decode_with_flags` plus its three outputs packed into one float32 vector
    ``[codes | actions | flags]`` (codes < G are exact in float32; :func:`unpack_decoded` is the inverse), so
    a copy to the host is one transfer; compiled, the packing fuses into the kernels that produce them."""
    codes, actions, flags = greedy_decode_with_flags(head, tokenizer, hidden)
    packed = torch.cat([rearrange(codes, "b c h l -> (b c h l)").float(), rearrange(actions, "b c a -> (b c a)").float(),
                        flags.float()])
    return codes, actions, flags, packed


def unpack_decoded(packed: np.ndarray, batch: int, cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`greedy_decode_packed`'s packing on the host: float32 ``[n]`` -> (codes int64
    ``[B, C, H, L]``, actions float32 ``[B, C, A]``, flags float32 ``[3]``). ``ShapeError`` if ``n`` does not
    match ``batch`` and ``cfg``'s sizes."""
    n_codes = batch * cfg.chunk_len * cfg.latent_dim * cfg.num_layers
    n_actions = batch * cfg.chunk_len * cfg.action_dim
    if packed.ndim != 1 or packed.size != n_codes + n_actions + 3:
        raise ShapeError(f"packed decode output has shape {packed.shape}, expected [{n_codes + n_actions + 3}] "
                         f"(B={batch}, C={cfg.chunk_len}, H={cfg.latent_dim}, L={cfg.num_layers}, A={cfg.action_dim}).")
    codes = rearrange(packed[:n_codes].astype(np.int64), "(b c h l) -> b c h l", b=batch, c=cfg.chunk_len,
                      h=cfg.latent_dim)
    actions = rearrange(packed[n_codes: n_codes + n_actions], "(b c a) -> b c a", b=batch, c=cfg.chunk_len)
    return codes, actions, packed[n_codes + n_actions:]


def greedy_rollout(head: torch.nn.Module, tokenizer: torch.nn.Module, base: torch.Tensor,
                   context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the head state before layer 0 (``base``, ``context`` [B, W]) -> (codes ``[B, C, H, L]``,
    normalized actions ``[B, C, A]``), without a single host sync: ``RFSQHead.rollout`` (the ops of
    ``greedy_decode``), the layout change, then ``decode_from_indices`` without its checks (argmax codes
    are in ``[0, G)`` by construction; the graph's flags re-check that for free)."""
    layers, _ = head.rollout(HeadState(base=base, context=context, layer=0))  # [B, L, C, H]
    codes = layers_to_codes(layers)  # [B, C, H, L]
    return codes, tokenizer.decode_from_indices(codes, validate=False)


@torch.inference_mode()
def argmax_regret(head: torch.nn.Module, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """How far ``codes`` [B, C, H, L] are from eager greedy decoding: per sample, the largest
    ``max_g logit - logit[code]`` over all tokens, with eager teacher-forced logits given the codes' own
    prefix (``RFSQHead.logits_given_prefix``) -> ``[B]`` float. 0 means every code is an eager argmax
    (ties included); a small positive value is a rounding tie broken the other way. Eager greedy codes
    have regret exactly 0."""
    prefix = codes_to_layers(codes)  # [B, C, H, L] -> [B, L, C, H]
    logits = head.logits_given_prefix(hidden, prefix)  # [B, L, C, H, G]
    chosen = logits.gather(-1, prefix[..., None])[..., 0]  # [B, L, C, H]
    return reduce(logits.amax(dim=-1) - chosen, "b l c h -> b", "max")

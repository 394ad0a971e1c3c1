"""The Llama-2 decoder of OpenVLA in plain PyTorch, with Hugging Face's parameter names (strict loads).

- :class:`LlamaSpec` the decoder sizes (a subset of ``transformers.LlamaConfig``);
- :class:`LlamaDecoder` ``LlamaForCausalLM``'s parameters; forward: input embeddings ``[B, T, D]`` -> final
  post-norm hidden states ``[B, T, D]`` (RMSNorm, RoPE, SiLU-gated MLP; ``causal=False`` is OFT's
  bidirectional attention);
- :func:`llama_layer_fn` one decoder layer as a function of its (fused) weights, what
  ``OpenVLAModel.optimize_for_inference(compile=True)`` compiles once for every layer.

Axis letters: B batch, T tokens, D width, h heads, d head width. ``lm_head`` is in the checkpoint, so it
exists here, but no forward pass runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from rsd.errors import ConfigError, ShapeError

__all__ = ["LlamaSpec", "LlamaDecoder", "RMSNorm", "llama_layer_fn", "rotary_tables"]


@dataclass(frozen=True)
class LlamaSpec:
    """The decoder sizes (a subset of ``transformers.LlamaConfig``)."""

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32064  # Llama-2's 32000 + <PAD>, padded to a multiple of 64 (OpenVLA's config)
    rms_norm_eps: float = 1e-5  # Llama-2-7B's value
    rope_theta: float = 10000.0
    max_positions: int = 2048

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"LlamaSpec: hidden_size {self.hidden_size}, num_heads {self.num_heads} and "
                              f"num_kv_heads {self.num_kv_heads} must divide evenly.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# modules (Hugging Face Llama parameter names)


class RMSNorm(nn.Module):
    """Llama's RMSNorm over the last axis, ``[.., D] -> [.., D]`` (statistics in float32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # as transformers' LlamaRMSNorm: statistics in float32, scale in the input dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _fuse_rows(linears: list[nn.Linear]) -> torch.Tensor:
    """One ``[sum(out), in]`` matrix holding the linears' weights; each weight becomes a view of it."""
    if any(lin.bias is not None for lin in linears):
        raise ConfigError("only bias-free projections are fused.")
    fused = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    offset = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[offset: offset + rows]
        offset += rows
    return fused


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_tables(seq_len: int, spec: LlamaSpec, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``cos, sin`` ``[T, head_dim]`` for positions ``0..T-1`` (transformers' Llama: float32, then cast)."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # [T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class _LlamaAttention(nn.Module):
    def __init__(self, spec: LlamaSpec, causal: bool) -> None:
        super().__init__()
        self.spec, self.causal = spec, causal
        d, hd = spec.hidden_size, spec.head_dim
        self.q_proj = nn.Linear(d, spec.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * hd, d, bias=False)

        self.qkv: torch.Tensor | None = None  # set by fuse(): q/k/v weights as views of one matrix

    def fuse(self) -> None:
        self.qkv = _fuse_rows([self.q_proj, self.k_proj, self.v_proj])

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        sizes = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        return F.linear(x, self.qkv).split(sizes, dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, last_query_only: bool = False
                ) -> torch.Tensor:
        """``x`` [B, T, D] -> [B, T, D]; with ``last_query_only`` -> [B, 1, D], the last position's output
        (every key and value is still computed; the last query attends to all of them either way)."""
        q, k, v = self._project(x)
        q = rearrange(q, "b t (h d) -> b h t d", h=self.spec.num_heads)
        k = rearrange(k, "b t (h d) -> b h t d", h=self.spec.num_kv_heads)
        v = rearrange(v, "b t (h d) -> b h t d", h=self.spec.num_kv_heads)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        causal = self.causal
        if last_query_only:
            q, causal = q[:, :, -1:], False
        gqa = self.spec.num_kv_heads != self.spec.num_heads
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # [B, h, T or 1, d]
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))


class _LlamaMLP(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

        self.gate_up: torch.Tensor | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up = _fuse_rows([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class _LlamaLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, causal: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = _LlamaAttention(spec, causal)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = _LlamaMLP(spec)

        self.kernel: Any = None  # optimize_for_inference(compile=True): the compiled llama_layer_fn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, T, D] -> [B, T, D], or the last position only, [B, 1, D]."""
        if self.kernel is not None:
            a, m = self.self_attn, self.mlp
            return self.kernel(x, cos, sin, self.input_layernorm.weight, a.qkv, a.o_proj.weight,
                               self.post_attention_layernorm.weight, m.gate_up, m.down_proj.weight,
                               eps=self.input_layernorm.eps, num_heads=a.spec.num_heads,
                               num_kv_heads=a.spec.num_kv_heads, causal=a.causal, last_only=last_only)
        attn = self.self_attn(self.input_layernorm(x), cos, sin, last_query_only=last_only)
        x = (x[:, -1:] if last_only else x) + attn
        return x + self.mlp(self.post_attention_layernorm(x))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()  # the arithmetic of RMSNorm
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def llama_layer_fn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w_in: torch.Tensor, w_qkv: torch.Tensor,
                   w_o: torch.Tensor, w_post: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, *,
                   eps: float, num_heads: int, num_kv_heads: int, causal: bool, last_only: bool) -> torch.Tensor:
    """One decoder layer with fused q/k/v and gate/up weights, as a function of its weights (the arithmetic
    of ``_LlamaLayer`` after ``fuse()``), so one ``torch.compile`` of it serves all layers."""
    hd = cos.shape[-1]
    h = _rms_norm(x, w_in, eps)
    q, k, v = F.linear(h, w_qkv).split([num_heads * hd, num_kv_heads * hd, num_kv_heads * hd], dim=-1)
    q = rearrange(q, "b t (h d) -> b h t d", h=num_heads)
    k = rearrange(k, "b t (h d) -> b h t d", h=num_kv_heads)
    v = rearrange(v, "b t (h d) -> b h t d", h=num_kv_heads)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if last_only:
        q, causal = q[:, :, -1:], False
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=num_kv_heads != num_heads)
    x = (x[:, -1:] if last_only else x) + F.linear(rearrange(out, "b h t d -> b t (h d)"), w_o)
    gate, up = F.linear(_rms_norm(x, w_post, eps), w_gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w_down)


class _LlamaBody(nn.Module):
    def __init__(self, spec: LlamaSpec, causal: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(_LlamaLayer(spec, causal) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaDecoder(nn.Module):
    """``LlamaForCausalLM``'s parameters (``model.*``, ``lm_head``); forward returns final hidden states."""

    def __init__(self, spec: LlamaSpec, causal: bool) -> None:
        super().__init__()
        self.spec = spec
        self.model = _LlamaBody(spec, causal)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)  # in the checkpoint, never run

    def forward(self, embeds: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``embeds`` [B, T, D] -> final post-norm hidden states [B, T, D] (``hidden_states[-1]`` in HF).

        ``last_only``: return [B, 1, D], the last position, computing the final layer's queries, output
        projection and MLP for that position only (the same values; 1/L of the layer work skipped)."""
        if embeds.shape[1] > self.spec.max_positions:
            raise ShapeError(f"sequence of {embeds.shape[1]} tokens exceeds max_positions {self.spec.max_positions}.")
        cos, sin = rotary_tables(embeds.shape[1], self.spec, embeds.device, embeds.dtype)
        x = embeds
        last = len(self.model.layers) - 1
        for index, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, last_only=last_only and index == last)
        return self.model.norm(x)

    def fuse(self) -> None:
        """Concatenate each layer's q/k/v and gate/up weights into one matrix (the parameters become views
        of it: no extra memory, same state dict): fewer, wider matmuls with the same products."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

"""The OpenVLA(-OFT) architecture in plain PyTorch, and a random-weight copy of it for timing.

One module tree, :class:`OpenVLAModel`, serves two users:

- ``rsd/backbones/openvla.py`` builds it on the meta device and strict-loads an OpenVLA-OFT checkpoint
  into it (parameter names match the checkpoint: timm ViT names for the towers, Hugging Face Llama
  names for the LLM, OFT's names for the proprio projector and the L1 action head);
- :class:`OpenVLAShapedBackbone` (registered as ``openvla-shaped``) fills it with random weights,
  in bf16 directly on the GPU, for latency measurements only.

Architecture (OpenVLA: Kim et al., arXiv 2406.09246; OFT: Kim et al., arXiv 2502.19645), sizes of the
7B model; axis letters B batch, N images, S image side, P patches per image, T tokens, D LLM width::

    images uint8 [B, N, S, S, 3]  (N = 2: full_image, wrist_image; S = 224)
      -> DINOv2 ViT-L/14 + 4 registers  -> output of block 22 of 24, prefix tokens dropped: [B*N, 256, 1024]
      -> SigLIP So400m/14               -> output of block 25 of 27:                       [B*N, 256, 1152]
      -> channel concat                                                                      [B, N*256, 2176]
      -> projector fc1 2176->8704, GELU, fc2 8704->4096, GELU, fc3 4096->4096                [B, 512, 4096]
    proprio float [B, 8] -> proprio projector fc1 8->4096, GELU, fc2 4096->4096              [B, 1, 4096]
    sequence = [<s>, 512 patch tokens, proprio token, prompt tokens after <s>]
      -> Llama-2-7B decoder (32 layers, 32 heads, MLP 11008, RMSNorm, RoPE), attention over the whole
         sequence in both directions (OFT's transformers fork sets is_causal=False everywhere)
      -> final RMSNorm -> hidden [B, T, 4096]

The RSD hidden state (:meth:`OpenVLAModel.rsd_hidden`) is the final-layer, post-norm hidden state at the
last prompt token (the empty token ``"▁"`` OFT appends after ``Out:``): ``T = 1 + N*256 + 1 + p`` where
``p`` counts the prompt tokens after ``<s>``. The L1 baseline (:meth:`OpenVLAModel.l1_actions`) runs
OFT's own layout, which appends ``C*A = 56`` zeroed action embeddings and ``</s>``, and feeds OFT's
L1 action head the final hidden states that OFT slices for it (see that method).

Blocks past the ones OpenVLA reads (DINOv2 block 23 and final norm, SigLIP block 26, final norm and
attention-pool head, the LLM's ``lm_head``) exist in the checkpoint, so they exist here (strict loads),
but no forward pass runs them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from rsd.backbones.base import check_hidden, image_batch, instructions_for_batch, register_backbone, state_batch
from rsd.errors import ConfigError, ShapeError

__all__ = [
    "ViTSpec",
    "LlamaSpec",
    "OpenVLAShape",
    "OpenVLAModel",
    "OpenVLAShapedBackbone",
    "PROMPT_TEMPLATE",
    "IMAGE_KEYS",
    "observation_tensors",
    "stand_in_token_ids",
    "group_by_prompt",
    "ungroup",
    "enable_fast_path",
]

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"  # OpenVLA(-OFT), lowercased task
IMAGE_KEYS = ("full_image", "wrist_image")  # OFT's image order on LIBERO: third-person first, then wrist
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2 tower
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # SigLIP tower


# configs


@dataclass(frozen=True)
class ViTSpec:
    """One timm ViT tower as OpenVLA builds it (``timm.create_model(id, num_classes=0, img_size=S)``)."""

    timm_id: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 14
    image_size: int = 224
    class_token: bool = False
    reg_tokens: int = 0
    layer_scale: bool = False  # DINOv2's LayerScale (OpenVLA renames its `gamma` to `scale_factor`)
    attn_pool: bool = False  # SigLIP's attention-pool head (in the checkpoint, never run)
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"ViT image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"ViT embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
        if self.depth < 2:
            raise ConfigError(f"ViT depth must be >= 2 (OpenVLA reads block depth-2), got {self.depth}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def blocks_run(self) -> int:
        """OpenVLA takes the output of block ``depth - 2`` (``get_intermediate_layers(n={depth-2})``)."""
        return self.depth - 1


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


DINOV2_L14_REG4 = ViTSpec("vit_large_patch14_reg4_dinov2.lvd142m", embed_dim=1024, depth=24, num_heads=16,
                          mlp_dim=4096, class_token=True, reg_tokens=4, layer_scale=True,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
SIGLIP_SO400M_14 = ViTSpec("vit_so400m_patch14_siglip_224", embed_dim=1152, depth=27, num_heads=16,
                           mlp_dim=4304, attn_pool=True)  # timm: mlp_ratio 3.7362 -> int(1152*3.7362) = 4304
# the same structures at CPU-test sizes (28 px images, 4 patches each)
TINY_DINOV2 = replace(DINOV2_L14_REG4, timm_id="rsd-tiny-dinov2", embed_dim=16, depth=3, num_heads=2, mlp_dim=32,
                      image_size=28)
TINY_SIGLIP = replace(SIGLIP_SO400M_14, timm_id="rsd-tiny-siglip", embed_dim=24, depth=3, num_heads=2, mlp_dim=40,
                      image_size=28)
#: tower specs by the timm id a checkpoint's config.json names
TOWERS = {spec.timm_id: spec for spec in (DINOV2_L14_REG4, SIGLIP_SO400M_14, TINY_DINOV2, TINY_SIGLIP)}


@dataclass(frozen=True)
class OpenVLAShape:
    """Everything that fixes the module tree and the token layout."""

    featurizer: ViTSpec = DINOV2_L14_REG4
    fused_featurizer: ViTSpec = SIGLIP_SO400M_14
    llm: LlamaSpec = field(default_factory=LlamaSpec)
    num_images: int = 2  # OFT on LIBERO: full_image + wrist_image
    proprio_dim: int = 8
    chunk_len: int = 8  # OFT's NUM_ACTIONS_CHUNK on LIBERO
    action_dim: int = 7  # OFT's ACTION_DIM
    bidirectional: bool = True  # OFT's fork of transformers: full attention

    def __post_init__(self) -> None:
        a, b = self.featurizer, self.fused_featurizer
        if (a.image_size, a.patch_size) != (b.image_size, b.patch_size):
            raise ConfigError(f"fused towers must share image_size/patch_size, got {a} and {b}.")
        if self.num_images < 1:
            raise ConfigError(f"num_images must be >= 1, got {self.num_images}.")

    @property
    def vision_dim(self) -> int:
        return self.featurizer.embed_dim + self.fused_featurizer.embed_dim

    @property
    def image_size(self) -> int:
        return self.featurizer.image_size

    @property
    def num_patch_tokens(self) -> int:
        """Patch tokens of all images plus the proprio token (OFT's ``NUM_PATCHES``)."""
        return self.num_images * self.featurizer.num_patches + 1

    def rsd_sequence_length(self, prompt_tokens: int) -> int:
        """``T`` of :meth:`OpenVLAModel.rsd_hidden` for ``prompt_tokens`` ids including ``<s>``."""
        return prompt_tokens + self.num_patch_tokens

    @classmethod
    def openvla_7b(cls, **overrides: Any) -> "OpenVLAShape":
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "OpenVLAShape":
        """Same structure, CPU-test sizes: 28 px images (4 patches each), a 2-layer D=32 decoder."""
        llm = LlamaSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64,
                        vocab_size=300, rms_norm_eps=1e-6, max_positions=256)
        base = dict(featurizer=TINY_DINOV2, fused_featurizer=TINY_SIGLIP, llm=llm)
        base.update(overrides)
        return cls(**base)


# vision towers (timm parameter names)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # timm's default nn.GELU (erf), for both towers


class _ViTAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, n, d], scale d ** -0.5 as timm
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class _ViTBlock(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _ViTAttention(dim, spec.num_heads)
        self.ls1 = _LayerScale(dim) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, spec.mlp_dim)
        self.ls2 = _LayerScale(dim) if spec.layer_scale else nn.Identity()

        self.kernel: Any = None  # optimize_for_inference(compile=True): the compiled vit_block_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, *self.weights(), num_heads=self.attn.num_heads)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def weights(self) -> tuple[torch.Tensor | None, ...]:
        ls1 = self.ls1.scale_factor if isinstance(self.ls1, _LayerScale) else None
        ls2 = self.ls2.scale_factor if isinstance(self.ls2, _LayerScale) else None
        return (self.norm1.weight, self.norm1.bias, self.attn.qkv.weight, self.attn.qkv.bias, self.attn.proj.weight,
                self.attn.proj.bias, ls1, self.norm2.weight, self.norm2.bias, self.mlp.fc1.weight, self.mlp.fc1.bias,
                self.mlp.fc2.weight, self.mlp.fc2.bias, ls2)


def vit_block_fn(x: torch.Tensor, n1w: torch.Tensor, n1b: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor,
                 proj_w: torch.Tensor, proj_b: torch.Tensor, ls1: torch.Tensor | None, n2w: torch.Tensor,
                 n2b: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor, fc2_b: torch.Tensor,
                 ls2: torch.Tensor | None, *, num_heads: int) -> torch.Tensor:
    """One timm ViT block as a function of its weights (what ``_ViTBlock.forward`` computes), so one
    ``torch.compile`` of it serves every block of a tower. ``x`` [B, N, E] -> [B, N, E]."""
    h = F.layer_norm(x, x.shape[-1:], n1w, n1b, eps=1e-6)
    q, k, v = rearrange(F.linear(h, qkv_w, qkv_b), "b n (three h d) -> three b h n d", three=3, h=num_heads)
    attn = F.linear(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"), proj_w, proj_b)
    x = x + (attn * ls1 if ls1 is not None else attn)
    h = F.layer_norm(x, x.shape[-1:], n2w, n2b, eps=1e-6)
    mlp = F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)
    return x + (mlp * ls2 if ls2 is not None else mlp)


class _PatchEmbed(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, spec.embed_dim, kernel_size=spec.patch_size, stride=spec.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d gh gw -> b (gh gw) d")  # row-major patches, as timm


class _AttentionPoolParams(nn.Module):
    """Parameters of timm's ``AttentionPoolLatent`` (SigLIP's pooling head). OpenVLA reads patch features,
    never the pooled vector, so this holds checkpoint tensors only and defines no forward pass."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.latent = nn.Parameter(torch.empty(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, spec.mlp_dim)


class TimmViT(nn.Module):
    """A timm ``VisionTransformer`` with OpenVLA's forward: the output of block ``depth - 2`` without
    the final norm and without prefix (class/register) tokens. ``[B, 3, S, S] -> [B, P, E]``."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = _PatchEmbed(spec)
        if spec.class_token:
            self.cls_token = nn.Parameter(torch.empty(1, 1, spec.embed_dim))
        if spec.reg_tokens:
            self.reg_token = nn.Parameter(torch.empty(1, spec.reg_tokens, spec.embed_dim))
        # pos_embed covers the patches only: DINOv2-reg uses no_embed_class=True, SigLIP has no class token
        self.pos_embed = nn.Parameter(torch.empty(1, spec.num_patches, spec.embed_dim))
        self.blocks = nn.ModuleList(_ViTBlock(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.embed_dim, eps=1e-6)
        if spec.attn_pool:
            self.attn_pool = _AttentionPoolParams(spec)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed  # [B, P, E]
        prefix = []
        if self.spec.class_token:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.spec.reg_tokens:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1)  # [B, prefix + P, E]
        for block in self.blocks[: self.spec.blocks_run]:
            x = block(x)
        return x[:, self.spec.num_prefix_tokens:]


class PrismaticVisionBackbone(nn.Module):
    """Both towers on every image: uint8 ``[B, N, S, S, 3]`` -> patch features ``[B, N*P, E1+E2]``.

    Each tower normalizes the 0..1 pixels with its own mean/std (OpenVLA's processor stacks the two
    normalized copies channel-wise; this computes the same thing on the device)."""

    def __init__(self, shape: OpenVLAShape) -> None:
        super().__init__()
        self.featurizer = TimmViT(shape.featurizer)
        self.fused_featurizer = TimmViT(shape.fused_featurizer)
        self._stats: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self.concurrent = False  # run the two towers on two CUDA streams (optimize_for_inference)
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    def _normalization(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per-tower mean/std ``[1, 3, 1, 1]`` float32 on ``device``: derived from the specs, not checkpoint
        state; made on the first (eager, warm-up) call per device, so a captured graph only reads them."""
        if device not in self._stats:
            specs = (self.featurizer.spec, self.fused_featurizer.spec)
            self._stats[device] = tuple(
                rearrange(torch.tensor(getattr(spec, stat), dtype=torch.float32, device=device), "c -> 1 c 1 1")
                for spec in specs for stat in ("mean", "std"))
        return self._stats[device]

    def forward(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        B = images.shape[0]
        dino_mean, dino_std, siglip_mean, siglip_std = self._normalization(images.device)
        x = rearrange(images, "b n h w c -> (b n) c h w").float() / 255.0  # TVF.to_tensor, float32
        dino = ((x - dino_mean) / dino_std).to(dtype)  # TVF.normalize in float32, then the model dtype
        siglip = ((x - siglip_mean) / siglip_std).to(dtype)
        if self.concurrent and images.is_cuda:
            dino_out, siglip_out = self._concurrent_towers(dino, siglip)
        else:
            dino_out, siglip_out = self.featurizer(dino), self.fused_featurizer(siglip)
        patches = torch.cat([dino_out, siglip_out], dim=-1)  # [B*N, P, E1+E2]
        return rearrange(patches, "(b n) p e -> b (n p) e", b=B)

    def _concurrent_towers(self, dino: torch.Tensor, siglip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DINOv2 on a side stream while SigLIP runs on the current one (each alone underfills the GPU at
        batch 1); joins before returning. Works inside CUDA-graph capture (fork/join of streams)."""
        main = torch.cuda.current_stream(dino.device)
        side = self._side_streams.setdefault(dino.device, torch.cuda.Stream(device=dino.device))
        side.wait_stream(main)
        with torch.cuda.stream(side):
            dino_out = self.featurizer(dino)
        siglip_out = self.fused_featurizer(siglip)
        main.wait_stream(side)
        if not torch.cuda.is_current_stream_capturing():
            dino_out.record_stream(main)  # made on `side`, used on `main`: keep the allocator from reusing it early
        return dino_out, siglip_out


class PrismaticProjector(nn.Module):
    """OpenVLA's fused-backbone projector: ``[.., E] -> [.., D]`` (fc1 E->4E, GELU, fc2 4E->D, GELU, fc3)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class ProprioProjector(nn.Module):
    """OFT's proprio projector: ``[B, P] -> [B, D]`` (fc1, GELU, fc2)."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# the language model (Hugging Face Llama parameter names)


class _RMSNorm(nn.Module):
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
        self.input_layernorm = _RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = _LlamaAttention(spec, causal)
        self.post_attention_layernorm = _RMSNorm(spec.hidden_size, spec.rms_norm_eps)
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
    x32 = x.float()  # the arithmetic of _RMSNorm
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
        self.norm = _RMSNorm(spec.hidden_size, spec.rms_norm_eps)


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


# OFT's L1 regression action head (parameter names of prismatic/models/action_heads.py)


class _MLPResNetBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class _MLPResNet(nn.Module):
    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.mlp_resnet_blocks = nn.ModuleList(_MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class OFTL1ActionHead(nn.Module):
    """OFT's ``L1RegressionActionHead``: action hidden states ``[B, C*A, D]`` -> normalized actions ``[B, C, A]``."""

    def __init__(self, llm_dim: int, hidden_dim: int, chunk_len: int, action_dim: int) -> None:
        super().__init__()
        self.chunk_len = chunk_len
        self.model = _MLPResNet(2, llm_dim * action_dim, hidden_dim, action_dim)

    def forward(self, action_hidden: torch.Tensor) -> torch.Tensor:
        # OFT: reshape(B, NUM_ACTIONS_CHUNK, -1): chunk step c reads the hidden states of tokens c*A .. c*A+A-1
        rows = rearrange(action_hidden, "b (c a) d -> b c (a d)", c=self.chunk_len)
        return self.model(rows)


# the whole model


class OpenVLAModel(nn.Module):
    """OpenVLA-OFT: ``vision_backbone``, ``projector``, ``language_model`` (the VLA checkpoint),
    ``proprio_projector`` and ``action_head`` (OFT's separate component checkpoints)."""

    def __init__(self, shape: OpenVLAShape) -> None:
        super().__init__()
        self.shape = shape
        d = shape.llm.hidden_size
        self.vision_backbone = PrismaticVisionBackbone(shape)
        self.projector = PrismaticProjector(shape.vision_dim, d)
        self.language_model = LlamaDecoder(shape.llm, causal=not shape.bidirectional)
        self.proprio_projector = ProprioProjector(d, shape.proprio_dim)
        self.action_head = OFTL1ActionHead(d, d, shape.chunk_len, shape.action_dim)  # OFT: hidden_dim = llm_dim
        self.optimized = False
        self.compiled = False
        self.compile_mode: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.fc1.weight.dtype

    # pieces (each is a pure tensor function, so each can be captured in a CUDA graph)

    def vision_embeds(self, images: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, N, S, S, 3]`` + proprio ``[B, P]`` -> patch and proprio tokens ``[B, N*256 + 1, D]``."""
        patches = self.projector(self.vision_backbone(images, self.dtype))  # [B, N*256, D]
        proprio_token = self.proprio_projector(proprio.to(self.dtype))  # [B, D]
        return torch.cat([patches, rearrange(proprio_token, "b d -> b 1 d")], dim=1)

    def prompt_sequence(self, vision: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``[<s>, vision tokens, prompt tokens after <s>]``: ``[B, 1 + V + (T_p - 1), D]``."""
        text = self.language_model.model.embed_tokens(prompt_ids)  # [B, T_p, D]
        return torch.cat([text[:, :1], vision, text[:, 1:]], dim=1)  # OFT inserts patches after <s>

    def llm_last_hidden(self, sequence: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> final post-norm hidden state of the last position ``[B, D]``."""
        return self.language_model(sequence, last_only=self.optimized)[:, -1]

    def optimize_for_inference(self, compile: bool = False, compile_mode: str | None = None) -> "OpenVLAModel":
        """Same function, fewer/wider kernels (each changes only rounding, within bf16 tolerance):
        fused q/k/v and gate/up matmuls, the final LLM layer computed for the last position only
        (:meth:`llm_last_hidden`), and on CUDA the two vision towers on concurrent streams.

        ``compile``: also run every decoder layer and ViT block through one ``torch.compile`` of
        :func:`llama_layer_fn` / :func:`vit_block_fn` (inductor fuses the norms, RoPE, activations and
        residual adds; matmuls and attention stay cuBLAS / flash). Compiles on first use per input shape.
        ``compile_mode``: ``torch.compile``'s mode, e.g. ``"max-autotune-no-cudagraphs"`` (inductor also
        times Triton matmul templates against cuBLAS for each shape: minutes of compiling, once per shape).
        Calling again with another mode recompiles.
        """
        if compile_mode is not None and not compile:
            raise ConfigError(f"compile_mode={compile_mode!r} applies to compiled layers: pass compile=True too.")
        if not self.optimized:
            self.language_model.fuse()
            self.vision_backbone.concurrent = self.projector.fc1.weight.is_cuda
            self.optimized = True
        if compile and (not self.compiled or compile_mode != self.compile_mode):
            import torch._dynamo

            import torch._inductor.config

            # one compiled graph per distinct input signature (prompt length x full/last-only layer)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            # round to bf16 wherever eager does (each .to(bf16)) inside fused kernels, so compiled == eager
            torch._inductor.config.emulate_precision_casts = True
            layer_kernel = torch.compile(llama_layer_fn, fullgraph=True, dynamic=False, mode=compile_mode)
            block_kernel = torch.compile(vit_block_fn, fullgraph=True, dynamic=False, mode=compile_mode)
            for layer in self.language_model.model.layers:
                layer.kernel = layer_kernel
            for tower in (self.vision_backbone.featurizer, self.vision_backbone.fused_featurizer):
                for block in tower.blocks:
                    block.kernel = block_kernel
            self.compiled, self.compile_mode = True, compile_mode
        return self

    @property
    def fast_path_key(self) -> tuple[bool, bool, str | None]:
        """What a CUDA graph of this model captured: (optimized, compiled, compile mode); a graph made under
        another key replays other kernels and must be re-captured."""
        return self.optimized, self.compiled, self.compile_mode

    def rsd_hidden(self, images: torch.Tensor, prompt_ids: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """The RSD hidden state ``[B, D]`` (model dtype): last prompt token, final layer, post-norm."""
        self._check_inputs(images, prompt_ids, proprio)
        return self.llm_last_hidden(self.prompt_sequence(self.vision_embeds(images, proprio), prompt_ids))

    def l1_actions(self, images: torch.Tensor, prompt_ids: torch.Tensor, proprio: torch.Tensor,
                   stop_id: int) -> torch.Tensor:
        """OFT's L1 path: normalized actions ``[B, C, A]`` from its own layout and action head.

        Layout (OFT ``predict_action``): ``[<s>, V vision tokens, p prompt tokens, C*A zero embeddings, </s>]``.
        OFT feeds its head ``hidden[:, V + p : V + p + C*A]`` (``NUM_PATCHES + NUM_PROMPT_TOKENS``),
        i.e. from the last prompt token through the second-to-last action token: each hidden state is
        the one that *predicts* the next token, which is how OFT trained the head. Reproduced exactly.
        """
        self._check_inputs(images, prompt_ids, proprio)
        B, n_act = prompt_ids.shape[0], self.shape.chunk_len * self.shape.action_dim
        vision = self.vision_embeds(images, proprio)
        prompt = self.prompt_sequence(vision, prompt_ids)  # [B, 1 + V + p, D]
        actions = prompt.new_zeros(B, n_act, prompt.shape[-1])  # OFT zeroes the action-token embeddings
        stop = self.language_model.model.embed_tokens(prompt_ids.new_full((B, 1), stop_id))
        hidden = self.language_model(torch.cat([prompt, actions, stop], dim=1))
        start = vision.shape[1] + (prompt_ids.shape[1] - 1)  # NUM_PATCHES + NUM_PROMPT_TOKENS
        return self.action_head(hidden[:, start:start + n_act])

    def _check_inputs(self, images: torch.Tensor, prompt_ids: torch.Tensor, proprio: torch.Tensor) -> None:
        s = self.shape
        expected = (s.num_images, s.image_size, s.image_size, 3)
        if images.ndim != 5 or tuple(images.shape[1:]) != expected or images.dtype != torch.uint8:
            raise ShapeError(f"images must be uint8 [B, {', '.join(map(str, expected))}], got "
                             f"{images.dtype} {list(images.shape)}.")
        if prompt_ids.ndim != 2 or prompt_ids.shape[0] != images.shape[0] or prompt_ids.shape[1] < 2:
            raise ShapeError(f"prompt_ids must be int64 [B, T] with T >= 2 (<s> + prompt), got {list(prompt_ids.shape)}.")
        if proprio.shape != (images.shape[0], s.proprio_dim):
            raise ShapeError(f"proprio must be [B, {s.proprio_dim}], got {list(proprio.shape)}.")


# random weights (timing only)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_openvla_model(shape: OpenVLAShape, *, device: str | torch.device, dtype: torch.dtype,
                         seed: int = 0) -> OpenVLAModel:
    """An :class:`OpenVLAModel` with random weights, created directly on ``device`` in ``dtype``.

    Linear/conv/embedding layers keep PyTorch's default init; the tensors PyTorch leaves empty get
    timm/Llama-like values (class/register tokens and position embeddings N(0, 0.02), LayerScale 1e-5,
    norm weights 1). For latency measurements only: these weights mean nothing.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _default_dtype(dtype), device:
        torch.manual_seed(seed)
        model = OpenVLAModel(shape)  # allowed: random weights for timing only (nn default init)
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("cls_token", "reg_token", "pos_embed", "latent"):
                nn.init.normal_(param, std=0.02)  # allowed: random weights for timing only
            elif leaf == "scale_factor":
                nn.init.constant_(param, 1e-5)
            elif isinstance(model.get_submodule(name.rsplit(".", 1)[0]), _RMSNorm):
                nn.init.ones_(param)
    return model.eval().requires_grad_(False)


# observation -> tensors (shared by the shaped and the real backbone)


def observation_tensors(observation: dict, shape: OpenVLAShape, *, image_keys: tuple[str, ...] = IMAGE_KEYS
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (images uint8 ``[B, N, S, S, 3]``, state float32 ``[B, P]``, B). Raises ShapeError/DTypeError."""

    keys = image_keys[: shape.num_images]
    if len(keys) != shape.num_images:
        raise ConfigError(f"{shape.num_images} images requested but only image keys {image_keys} are known.")
    images, flags = [], []
    for key in keys:
        image, batched = image_batch(observation, key, shape.image_size)
        images.append(image)
        flags.append(batched)
    state, state_batched = state_batch(observation, shape.proprio_dim)
    sizes = {key: image.shape[0] for key, image in zip(keys, images)} | {"state": state.shape[0]}
    if len(set(flags + [state_batched])) != 1 or len(set(sizes.values())) != 1:
        raise ShapeError(f"observation keys disagree on the batch: leading sizes {sizes}; batch all keys or none.")
    return torch.stack(images, dim=1), state, state.shape[0]


_TOKEN = re.compile(r"\w+|[^\w\s]|\n")


def stand_in_token_ids(prompt: str, vocab_size: int, *, bos_id: int = 1, empty_id: int = 29871) -> list[int]:
    """Token ids for the random-weight model: ``<s>``, one id per word / punctuation mark / newline
    (blake2b bucket in ``[3, vocab_size)``), then OFT's empty token. A stand-in for Llama-2's
    SentencePiece (no tokenizer can be downloaded here): about one token per English word, as Llama's."""
    if vocab_size <= max(3, empty_id):
        empty_id = vocab_size - 1
    ids = [bos_id]
    for token in _TOKEN.findall(prompt):
        digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
        ids.append(3 + int.from_bytes(digest, "little") % (vocab_size - 3))
    return ids + [empty_id]


def enable_fast_path(model: OpenVLAModel, device: torch.device, compile: bool,
                     compile_mode: str | None) -> tuple[bool, bool, str | None]:
    """``model.optimize_for_inference(compile, compile_mode)`` on a CUDA device -> its ``fast_path_key``
    (what the backbones' ``set_fast`` compares to decide whether their CUDA graphs must be re-captured)."""
    if device.type != "cuda":
        raise ConfigError(f"the fast path (CUDA graphs) needs a CUDA device; this backbone is on {device}.")
    return model.optimize_for_inference(compile=compile, compile_mode=compile_mode).fast_path_key


@register_backbone("openvla-shaped")
class OpenVLAShapedBackbone:
    """OpenVLA-OFT-shaped backbone with RANDOM weights, for latency measurements only.

    ``encode(observation, instruction) -> float32 [B, D]`` runs exactly the computation of the real
    adapter (:class:`rsd.backbones.openvla.OpenVLAOFTBackbone`): ``num_images`` 224 px images through both towers,
    the projector, the proprio token and the prompt through the 7B decoder, bidirectional attention.
    Prompt ids come from :func:`stand_in_token_ids`. Proprio is fed as given (no statistics exist for
    random weights). Policies built on it cannot be saved: its weights mean nothing.

    Args:
        size: ``"7b"`` (OpenVLA-7B sizes) or ``"tiny"`` (CPU tests).
        device, dtype: where and in what the weights are created (default bf16 on CUDA, float32 on CPU).
        seed: weight-init seed.
        fast: the fast path (:meth:`set_fast`); CUDA only.
        num_images: ``2`` (OFT on LIBERO: ``full_image`` + ``wrist_image``, 545 tokens with the LIBERO
            prompt) or ``1`` (``full_image`` only, OFT's 1-image configuration: 289 tokens).
    """

    backbone_name: str  # set by @register_backbone

    def __init__(self, size: str = "7b", *, device: str | torch.device = "cuda", dtype: torch.dtype | None = None,
                 seed: int = 0, fast: bool = False, num_images: int = 2) -> None:
        shapes = {"7b": OpenVLAShape.openvla_7b, "tiny": OpenVLAShape.tiny}
        if size not in shapes:
            raise ConfigError(f"OpenVLAShapedBackbone size must be one of {sorted(shapes)}, got {size!r}.")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= len(IMAGE_KEYS):
            raise ConfigError(f"OpenVLAShapedBackbone num_images must be 1 ({IMAGE_KEYS[0]}) or 2 "
                              f"({', '.join(IMAGE_KEYS)}), got {num_images!r}.")
        self.device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.size, self.shape = size, shapes[size](num_images=num_images)
        self.model = random_openvla_model(self.shape, device=self.device, dtype=dtype, seed=seed)
        self.hidden_dim = self.shape.llm.hidden_size
        self._token_cache: dict[str, torch.Tensor] = {}
        self._graph_key: tuple[bool, bool, str | None] | None = None  # what the CUDA graph was captured from
        self.set_fast(fast)

    def set_fast(self, enabled: bool, *, compile: bool = False, compile_mode: str | None = None) -> None:
        """Switch between eager execution and the fast path: ``OpenVLAModel.optimize_for_inference(compile,
        compile_mode)`` (applied once, kept afterwards) replayed through CUDA graphs (re-captured when the
        compilation changes)."""
        if enabled:
            from rsd.fastpath import CudaGraphFn

            key = enable_fast_path(self.model, self.device, compile, compile_mode)
            if key != self._graph_key:
                self._graphed = CudaGraphFn(self.model.rsd_hidden, device=self.device)
                self._graph_key = key
        self.fast = bool(enabled)
        self._hidden_fn = self._graphed if enabled else self.model.rsd_hidden

    def prompt_ids(self, instruction: str) -> torch.Tensor:
        """int64 ``[T]`` on the device (cached per instruction)."""
        if instruction not in self._token_cache:
            prompt = PROMPT_TEMPLATE.format(instruction=instruction.lower())
            ids = stand_in_token_ids(prompt, self.shape.llm.vocab_size)
            self._token_cache[instruction] = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return self._token_cache[instruction]

    def inputs(self, observation: dict, instruction: str | list[str]) -> list[tuple[torch.Tensor, ...]]:
        """Model inputs, one ``(images, prompt_ids, proprio)`` group per distinct prompt length."""
        images, state, batch = observation_tensors(observation, self.shape)
        texts = instructions_for_batch(instruction, batch)
        return group_by_prompt(images.to(self.device), [self.prompt_ids(t) for t in texts], state.to(self.device))

    @torch.inference_mode()
    def encode(self, observation: dict, instruction: str | list[str]) -> torch.Tensor:
        groups = self.inputs(observation, instruction)
        hidden = ungroup([self._hidden_fn(images, ids, state) for (images, ids, state, _) in groups], groups)
        return check_hidden(hidden.float(), self.hidden_dim)

    def spec_kwargs(self) -> dict[str, Any]:
        raise ConfigError("openvla-shaped has random weights (timing only); a policy built on it cannot be saved.")

    def save_weights(self, directory: Path) -> None:
        raise ConfigError("openvla-shaped has random weights (timing only); a policy built on it cannot be saved.")

    @classmethod
    def load_spec(cls, kwargs: dict[str, Any], directory: Path, *, device: str | torch.device = "cpu") -> None:
        raise ConfigError("openvla-shaped has random weights (timing only); nothing to load.")


def group_by_prompt(images: torch.Tensor, ids: list[torch.Tensor], state: torch.Tensor
                     ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]]:
    """Batch elements whose prompts have the same length run together (no padding is ever attended):
    ``[(images [b, ...], prompt_ids [b, T], state [b, P], batch indices)]``."""
    by_length: dict[int, list[int]] = {}
    for index, row in enumerate(ids):
        by_length.setdefault(int(row.shape[0]), []).append(index)
    if len(by_length) == 1:  # one length (always at batch 1): the inputs as they are, no gather kernels
        return [(images, torch.stack(ids), state, list(range(len(ids))))]
    groups = []
    for rows in by_length.values():
        pick = torch.tensor(rows, device=images.device)
        groups.append((images[pick], torch.stack([ids[i] for i in rows]), state[pick], rows))
    return groups


def ungroup(outputs: list[torch.Tensor], groups: list[tuple[Any, ...]]) -> torch.Tensor:
    """Inverse of :func:`group_by_prompt` for per-element outputs ``[b, ...]`` -> ``[B, ...]``."""
    if len(outputs) == 1:
        return outputs[0]
    batch = sum(len(g[-1]) for g in groups)
    out = outputs[0].new_empty((batch, *outputs[0].shape[1:]))
    for result, group in zip(outputs, groups):
        out[torch.tensor(group[-1], device=out.device)] = result
    return out

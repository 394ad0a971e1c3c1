"""OpenVLA's two vision towers in plain PyTorch, with timm's parameter names (strict checkpoint loads).

- :class:`ViTSpec` the sizes of one timm ViT; :data:`TOWERS` the specs by the timm id a checkpoint's
  ``config.json`` names (DINOv2 ViT-L/14 + 4 registers, SigLIP So400m/14, and their CPU-test versions);
- :class:`TimmViT` one tower with OpenVLA's forward (output of block ``depth - 2``, prefix tokens dropped);
- :class:`PrismaticVisionBackbone` both towers on every image, features concatenated per patch.

Axis letters: B batch, N images, S image side, P patches per image, E tower width.
Blocks past the ones OpenVLA reads (DINOv2 block 23 and final norm, SigLIP block 26, final norm and
attention-pool head) exist in the checkpoint, so they exist here, but no forward pass runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from rsd.errors import ConfigError

__all__ = [
    "ViTSpec",
    "DINOV2_L14_REG4",
    "SIGLIP_SO400M_14",
    "TINY_DINOV2",
    "TINY_SIGLIP",
    "TOWERS",
    "TimmViT",
    "PrismaticVisionBackbone",
    "vit_block_fn",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2 tower
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # SigLIP tower


# tower sizes


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


# modules (timm parameter names)


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

    def __init__(self, featurizer: ViTSpec, fused_featurizer: ViTSpec) -> None:
        super().__init__()
        self.featurizer = TimmViT(featurizer)
        self.fused_featurizer = TimmViT(fused_featurizer)
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

"""The OpenVLA(-OFT) model in plain PyTorch: :class:`OpenVLAModel` and its sizes, :class:`OpenVLAShape`.

One module tree serves two users:

- ``rsd/backbones/openvla.py`` builds it on the meta device and strict-loads an OpenVLA-OFT checkpoint
  into it (parameter names match the checkpoint: timm ViT names for the towers, Hugging Face Llama
  names for the LLM, OFT's names for the proprio projector and the L1 action head);
- ``rsd/backbones/openvla_shaped.py`` fills it with random weights, in bf16 directly on the GPU, for
  latency measurements only.

Its parts: the vision towers (``openvla_towers.py``), the Llama decoder (``openvla_llama.py``), and here
the projectors, OFT's L1 action head and the assembly. Observation -> model inputs: ``openvla_inputs.py``.

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

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from rsd.backbones.openvla_llama import LlamaDecoder, LlamaSpec, llama_layer_fn
from rsd.backbones.openvla_towers import (DINOV2_L14_REG4, SIGLIP_SO400M_14, TINY_DINOV2, TINY_SIGLIP,
                                          PrismaticVisionBackbone, ViTSpec, vit_block_fn)
from rsd.errors import ConfigError, ShapeError

__all__ = ["OpenVLAShape", "OpenVLAModel", "OFTL1ActionHead", "PrismaticProjector", "ProprioProjector",
           "enable_fast_path"]


# sizes


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


# projectors (OpenVLA / OFT parameter names)


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
        self.vision_backbone = PrismaticVisionBackbone(shape.featurizer, shape.fused_featurizer)
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


# the fast path


def enable_fast_path(model: OpenVLAModel, device: torch.device, compile: bool,
                     compile_mode: str | None) -> tuple[bool, bool, str | None]:
    """``model.optimize_for_inference(compile, compile_mode)`` on a CUDA device -> its ``fast_path_key``
    (what the backbones' ``set_fast`` compares to decide whether their CUDA graphs must be re-captured)."""
    if device.type != "cuda":
        raise ConfigError(f"the fast path (CUDA graphs) needs a CUDA device; this backbone is on {device}.")
    return model.optimize_for_inference(compile=compile, compile_mode=compile_mode).fast_path_key

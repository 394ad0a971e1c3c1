"""A random-weight OpenVLA-OFT model for timing: :class:`OpenVLAShapedBackbone` (``openvla-shaped``).

The architecture is :class:`~rsd.backbones.openvla_arch.OpenVLAModel` (the one the checkpoint adapter
``openvla.py`` loads); here :func:`random_openvla_model` fills it with random weights, in bf16 directly
on the GPU, and :func:`stand_in_token_ids` stands in for Llama-2's tokenizer. For latency measurements
only: these weights mean nothing, and a policy built on them cannot be saved.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsd.backbones.base import check_hidden, instructions_for_batch, register_backbone
from rsd.backbones.openvla_arch import OpenVLAModel, OpenVLAShape, enable_fast_path
from rsd.backbones.openvla_inputs import group_by_prompt, observation_tensors, ungroup
from rsd.backbones.openvla_llama import LlamaSpec, RMSNorm
from rsd.backbones.openvla_towers import ViTSpec
from rsd.errors import ConfigError
from rsd.observation import IMAGE_KEYS
from rsd.prompt import PROMPT_TEMPLATE, openvla_prompt

__all__ = ["OpenVLAShapedBackbone", "random_openvla_model", "stand_in_token_ids",
           # re-exported: what this module exported before the architecture moved to openvla_arch / _towers /
           # _llama / _inputs
           "ViTSpec", "LlamaSpec", "OpenVLAShape", "OpenVLAModel", "PROMPT_TEMPLATE", "IMAGE_KEYS",
           "observation_tensors", "group_by_prompt", "ungroup", "enable_fast_path"]


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
            elif isinstance(model.get_submodule(name.rsplit(".", 1)[0]), RMSNorm):
                nn.init.ones_(param)
    return model.eval().requires_grad_(False)


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
            prompt = openvla_prompt(instruction)
            ids = stand_in_token_ids(prompt, self.shape.llm.vocab_size)
            self._token_cache[instruction] = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return self._token_cache[instruction]

    def inputs(self, observation: dict, instruction: str | list[str]) -> list[tuple[torch.Tensor, ...]]:
        """Model inputs, one ``(images, prompt_ids, proprio)`` group per distinct prompt length."""
        images, state, batch = observation_tensors(observation, self.shape)
        texts = instructions_for_batch(instruction, batch)
        return group_by_prompt(images.to(self.device), [self.prompt_ids(t) for t in texts], state.to(self.device))

    @torch.inference_mode()
    def encode(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        """The random model's RSD hidden state, float32 ``[B, D]``; ``check``: through ``check_hidden`` (one
        host sync), else unchecked for a caller that checks it once."""
        groups = self.inputs(observation, instruction)
        hidden = ungroup([self._hidden_fn(images, ids, state) for (images, ids, state, _) in groups], groups)
        return check_hidden(hidden.float(), self.hidden_dim) if check else hidden.float()

    def spec_kwargs(self) -> dict[str, Any]:
        raise ConfigError("openvla-shaped has random weights (timing only); a policy built on it cannot be saved.")

    def save_weights(self, directory: Path) -> None:
        raise ConfigError("openvla-shaped has random weights (timing only); a policy built on it cannot be saved.")

    @classmethod
    def load_spec(cls, kwargs: dict[str, Any], directory: Path, *, device: str | torch.device = "cpu") -> None:
        raise ConfigError("openvla-shaped has random weights (timing only); nothing to load.")

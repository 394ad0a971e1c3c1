"""OpenVLA-OFT checkpoints as an rsd backbone: the RSD hidden state, and OFT's own L1 actions.

The checkpoint (e.g. ``moojink/openvla-7b-oft-finetuned-libero-spatial``) is a directory with
``config.json``, ``model*.safetensors`` (+ index), ``dataset_statistics.json``, the processor/tokenizer
files, and OFT's component checkpoints ``proprio_projector--*_checkpoint.pt`` and
``action_head--*_checkpoint.pt``. rsd runs none of the checkpoint's Python code: the architecture is
rsd's own :class:`~rsd.backbones.openvla_arch.OpenVLAModel` (whose parameter names are the
checkpoint's), built on the meta device, so it holds no weights at all until the strict load
(``rsd.backbones.openvla_checkpoint``) puts every tensor there from the files. The tokenizer loads through
``AutoTokenizer`` (no remote code: OpenVLA's tokenizer is a plain Llama tokenizer).

Guard rails (``rsd.backbones.openvla_checkpoint.check_suite``; WrongBaseModelError unless
``allow_suite_mismatch=True``): the base ``openvla/openvla-7b``, a checkpoint named for other LIBERO
suites, statistics without the suite's key. The unnorm key is ``<suite>`` or ``<suite>_no_noops``
(``rsd.normalize.resolve_unnorm_key``); an explicit ``unnorm_key`` naming other statistics
(``libero_object_no_noops`` for ``libero_spatial``, ``bridge_orig``) is refused the same way.

Pixels: the observation carries OFT's uncropped 224 px images (``rsd.sim.protocol.preprocess_image``);
the backbone applies OFT's 0.9-area centre crop to every view before the model sees it
(``center_crop=True``, OFT's default: its LIBERO checkpoints were trained with random-crop augmentation), so
the model input is ``rsd.images.oft_model_input(frame)`` for each camera. ``center_crop=False`` is for a
checkpoint trained without crop augmentation; it is part of the backbone's spec (saved with a policy).

What :meth:`OpenVLAOFTBackbone.encode` returns: see :meth:`OpenVLAModel.rsd_hidden` (final layer,
post-norm, last prompt token, ``[B, 4096]``, float32). :meth:`OpenVLAOFTBackbone.predict_actions` is OFT's
L1 head on its action-token hidden states (``rsd.policy.oft.OFTL1Policy`` puts it behind the Policy protocol).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rsd.backbones.base import _check_spec_kwargs, check_hidden, instructions_for_batch, register_backbone
from rsd.backbones.openvla_arch import OpenVLAModel, enable_fast_path
from rsd.backbones.openvla_checkpoint import (BASE_MODELS, DTYPES, check_preprocessor, check_suite, load_oft_state_dict,
                                              read_json, resolve_checkpoint_dir, shape_from_config, strict_assign,
                                              suites_named_in)
from rsd.backbones.openvla_inputs import group_by_prompt, observation_tensors, ungroup
from rsd.prompt import openvla_prompt
from rsd.errors import (
    CheckpointMismatchError,
    ConfigError,
    UnknownUnnormKeyError,
    WrongBaseModelError,
)
from rsd.images import center_crop_image
from rsd.observation import IMAGE_KEYS
from rsd.suites import LIBERO_SUITES

# re-exported: what this module exported before the guard rails and the file loading moved to openvla_checkpoint
# (OFTL1Policy moved to rsd.policy.oft: importing it here would tie backbones and policies in a circle)
__all__ = ["OpenVLAOFTBackbone", "LIBERO_SUITES", "BASE_MODELS", "check_suite", "suites_named_in", "shape_from_config",
           "load_oft_state_dict"]

# the backbone


@register_backbone("openvla-oft")
class OpenVLAOFTBackbone:
    """OpenVLA-OFT as a Backbone: ``encode(observation, instruction) -> float32 [B, 4096]``.

    Build with :meth:`from_pretrained`. Also :meth:`predict_actions` (OFT's own L1 head, normalized
    ``[B, C, A]``), :attr:`action_stats` / :attr:`proprio_stats` (``dataset_statistics.json[unnorm_key]``).
    """

    backbone_name: str  # set by @register_backbone

    def __init__(self, model: OpenVLAModel, tokenizer: Any, stats: dict[str, dict[str, Any]], *, source: str,
                 suite: str, unnorm_key: str, allow_suite_mismatch: bool, device: torch.device, fast: bool,
                 center_crop: bool = True) -> None:
        from rsd.normalize import BoundsQ99Normalizer

        self.model, self.tokenizer, self.stats = model, tokenizer, stats
        self.source, self.suite, self.unnorm_key = source, suite, unnorm_key
        self.allow_suite_mismatch, self.device = allow_suite_mismatch, device
        if not isinstance(center_crop, bool):
            raise ConfigError(f"center_crop must be True or False, got {center_crop!r}.")
        self.center_crop = center_crop
        self.shape = model.shape
        self.hidden_dim = self.shape.llm.hidden_size
        entry = stats[unnorm_key]
        if "proprio" not in entry:
            raise ConfigError(f"dataset_statistics.json[{unnorm_key!r}] has no 'proprio' statistics; OFT needs them.")
        self.action_stats, self.proprio_stats = entry["action"], entry["proprio"]
        if self.proprio_stats.dim != self.shape.proprio_dim:
            raise ConfigError(f"proprio statistics have {self.proprio_stats.dim} dims, the proprio projector takes "
                              f"{self.shape.proprio_dim}.")
        self._proprio_normalizer = BoundsQ99Normalizer(self.proprio_stats)
        self.bos_id, self.stop_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.empty_id = tokenizer.convert_tokens_to_ids("\u2581")  # OFT's 29871 in Llama-2's vocabulary
        if None in (self.bos_id, self.stop_id) or self.empty_id in (None, tokenizer.unk_token_id):
            raise ConfigError(f"tokenizer lacks <s> ({self.bos_id}), </s> ({self.stop_id}) or the empty token "
                              f"'\u2581' ({self.empty_id}); is it OpenVLA's Llama tokenizer?")
        self._token_cache: dict[str, torch.Tensor] = {}
        self._graphed: tuple[Any, Any] | None = None
        self._graph_key: tuple[bool, bool, str | None] | None = None
        self.set_fast(fast)

    def set_fast(self, enabled: bool, *, compile: bool = False, compile_mode: str | None = None) -> None:
        """Switch between eager execution and the fast path (``OpenVLAShapedBackbone.set_fast``'s): the
        optimized (optionally compiled) model replayed through CUDA graphs, re-captured when that changes."""
        if enabled:
            from rsd.fastpath import CudaGraphFn

            key = enable_fast_path(self.model, self.device, compile, compile_mode)
            if key != self._graph_key:
                self._graphed = (CudaGraphFn(self.model.rsd_hidden, device=self.device),
                                 CudaGraphFn(self._l1_actions, device=self.device))
                self._graph_key = key
        self.fast = bool(enabled)
        self._hidden_fn, self._actions_fn = self._graphed if enabled else (self.model.rsd_hidden, self._l1_actions)

    def _l1_actions(self, images: torch.Tensor, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.model.l1_actions(images, ids, state, stop_id=self.stop_id)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, suite: str, *, unnorm_key: str | None = None,
                        allow_suite_mismatch: bool = False, num_images: int = 2, device: str | torch.device = "cuda",
                        dtype: str = "bfloat16", fast: bool = False, local_files_only: bool = False,
                        center_crop: bool = True) -> "OpenVLAOFTBackbone":
        """Load a local directory or hub id; see the module docstring for the checks. ``dtype`` is the
        compute dtype (OFT runs bf16); ``fast`` uses CUDA graphs (``rsd.fastpath``); ``center_crop`` applies
        OFT's centre crop to every view (keep it unless the checkpoint was trained without crop augmentation)."""
        from transformers import AutoTokenizer

        from rsd.normalize import load_dataset_statistics, resolve_unnorm_key

        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
        device = torch.device(device)
        name = os.fspath(path_or_id)
        directory = resolve_checkpoint_dir(path_or_id, local_files_only)
        config = read_json(directory / "config.json", "config.json")
        stats = load_dataset_statistics(directory / "dataset_statistics.json")
        label = f"{name} ({config['_name_or_path']})" if config.get("_name_or_path") else name
        check_suite([name, str(config.get("_name_or_path", ""))], list(stats), suite,
                    allow_suite_mismatch=allow_suite_mismatch)
        if unnorm_key is None:
            unnorm_key = resolve_unnorm_key(stats, suite)
        elif unnorm_key not in stats:
            raise UnknownUnnormKeyError(f"unnorm_key {unnorm_key!r} is not in {label}'s dataset_statistics.json; "
                                        f"keys: {sorted(stats)}.")
        elif unnorm_key not in (suite, f"{suite}_no_noops") and not allow_suite_mismatch:
            raise WrongBaseModelError(
                f"unnorm_key {unnorm_key!r} names statistics of another dataset than {suite!r}: the actions would be "
                f"un-normalized with the wrong ranges. Leave unnorm_key unset (it resolves to {suite!r} or "
                f"{suite + '_no_noops'!r}), or pass allow_suite_mismatch=True to run these statistics on {suite} on "
                f"purpose.")
        shape = shape_from_config(config, num_images=num_images)
        check_preprocessor(directory, shape)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

        with torch.device("meta"):
            model = OpenVLAModel(shape)  # no storage, no init: every tensor must come from the files
        strict_assign(model, load_oft_state_dict(directory, device=device), label)
        model = model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if on_meta:
            raise CheckpointMismatchError(f"tensors left without checkpoint data: {on_meta[:6]}.")
        return cls(model, tokenizer, stats, source=name, suite=suite, unnorm_key=unnorm_key,
                   allow_suite_mismatch=allow_suite_mismatch, device=device, fast=fast, center_crop=center_crop)

    # inputs

    def prompt_ids(self, instruction: str) -> torch.Tensor:
        """OFT's prompt ids ``[T]``: ``<s>`` + the prompt + the empty token ``"▁"`` (cached per instruction)."""
        if instruction not in self._token_cache:
            prompt = openvla_prompt(instruction)
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if not ids or ids[0] != self.bos_id:
                raise ConfigError(f"the tokenizer did not start the prompt with <s> ({self.bos_id}): {ids[:4]}.")
            if ids[-1] != self.empty_id:  # OFT appends it when missing, to match training inputs
                ids = ids + [self.empty_id]
            self._token_cache[instruction] = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return self._token_cache[instruction]

    def model_images(self, observation: Mapping[str, Any]) -> dict[str, Any]:
        """``observation`` with each view the model reads replaced by the pixels it sees: OFT's centre crop
        of the (uncropped, 224 px) observation image when ``center_crop``, else the image itself.
        uint8 ``[S, S, 3]`` or ``[B, S, S, 3]`` per view; the input is never modified."""
        out = dict(observation)
        if not self.center_crop:
            return out
        for key in IMAGE_KEYS[: self.shape.num_images]:
            if key not in out:
                continue  # observation_tensors names the missing key
            image = out[key]
            image = image.numpy(force=True) if isinstance(image, torch.Tensor) else np.asarray(image)
            if image.dtype != np.uint8 or image.ndim not in (3, 4):
                continue  # observation_tensors names the dtype / shape problem
            out[key] = (center_crop_image(image) if image.ndim == 3 else
                        np.stack([center_crop_image(view) for view in image]))
        return out

    def _groups(self, observation: dict, instruction: str | list[str]) -> list[tuple[Any, ...]]:
        images, state, batch = observation_tensors(self.model_images(observation), self.shape)
        proprio = torch.from_numpy(self._proprio_normalizer.normalize(state.numpy()))
        texts = instructions_for_batch(instruction, batch)
        return group_by_prompt(images.to(self.device), [self.prompt_ids(t) for t in texts], proprio.to(self.device))

    # outputs

    @torch.inference_mode()
    def encode(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        """The RSD hidden state, float32 ``[B, 4096]`` (see :meth:`OpenVLAModel.rsd_hidden`). ``check`` runs
        ``check_hidden`` (shape, NaN/inf; one host sync): keep it for standalone use; a policy that checks
        the hidden state once itself passes ``check=False``."""
        groups = self._groups(observation, instruction)
        hidden = ungroup([self._hidden_fn(images, ids, state) for images, ids, state, _ in groups], groups).float()
        return check_hidden(hidden, self.hidden_dim) if check else hidden

    @torch.inference_mode()
    def predict_actions(self, observation: dict, instruction: str | list[str]) -> torch.Tensor:
        """OFT's L1 head: normalized actions float32 ``[B, C, A]`` (un-normalize with :attr:`action_stats`)."""
        groups = self._groups(observation, instruction)
        actions = ungroup([self._actions_fn(images, ids, state) for images, ids, state, _ in groups], groups)
        return actions.float()

    # save / load hooks (the weights stay in the checkpoint directory)

    def spec_kwargs(self) -> dict[str, Any]:
        dtype = next(k for k, v in DTYPES.items() if v == self.model.dtype)
        return dict(path_or_id=self.source, suite=self.suite, unnorm_key=self.unnorm_key,
                    allow_suite_mismatch=self.allow_suite_mismatch, num_images=self.shape.num_images,
                    dtype=dtype, fast=self.fast, center_crop=self.center_crop)

    def save_weights(self, directory: Path) -> None:
        """Nothing to write: the policy refers to the checkpoint by ``path_or_id``."""

    @classmethod
    def load_spec(cls, kwargs: dict[str, Any], directory: Path, *, device: str | torch.device = "cpu"
                  ) -> "OpenVLAOFTBackbone":
        _check_spec_kwargs(cls.from_pretrained, kwargs, "OpenVLAOFTBackbone", exclude=("device", "local_files_only"))
        return cls.from_pretrained(**kwargs, device=device)

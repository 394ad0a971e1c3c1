"""OpenVLA-OFT checkpoints as an rsd backbone (RSD hidden state) and as the L1 baseline policy.

The checkpoint (e.g. ``moojink/openvla-7b-oft-finetuned-libero-spatial``) is a directory with
``config.json``, ``model*.safetensors`` (+ index), ``dataset_statistics.json``, the processor/tokenizer
files, and OFT's component checkpoints ``proprio_projector--*_checkpoint.pt`` and
``action_head--*_checkpoint.pt``. rsd runs none of the checkpoint's Python code: the architecture is
rsd's own :class:`~rsd.backbones.openvla_shaped.OpenVLAModel` (whose parameter names are the
checkpoint's), built on the meta device, so it holds no weights at all until the strict load puts
every tensor there from the files (missing, unexpected or reshaped entries raise
:class:`~rsd.errors.CheckpointMismatchError`). The tokenizer loads through ``AutoTokenizer`` (no remote
code: OpenVLA's tokenizer is a plain Llama tokenizer).

Guard rails (:class:`~rsd.errors.WrongBaseModelError` unless ``allow_suite_mismatch=True``): the base
``openvla/openvla-7b`` (never trained on LIBERO), a checkpoint whose name names other LIBERO suites
than the requested one (``...-libero-spatial`` for ``libero_object``), or one whose
``dataset_statistics.json`` has no key for the suite. The unnorm key is ``<suite>`` or
``<suite>_no_noops`` (``rsd.normalize.resolve_unnorm_key``); an explicit ``unnorm_key`` naming other
statistics (``libero_object_no_noops`` for ``libero_spatial``, ``bridge_orig``) is refused the same way.

Pixels: the observation carries OFT's uncropped 224 px images (``rsd.sim.protocol.preprocess_image``);
the backbone applies OFT's 0.9-area centre crop to every view before the model sees it
(``center_crop=True``, OFT's default: its LIBERO checkpoints were trained with random-crop augmentation), so
the model input is ``rsd.images.oft_model_input(frame)`` for each camera. ``center_crop=False`` is for a
checkpoint trained without crop augmentation; it is part of the backbone's spec (saved with a policy).

What :meth:`OpenVLAOFTBackbone.encode` returns: see :meth:`OpenVLAModel.rsd_hidden` (final layer,
post-norm, last prompt token, ``[B, 4096]``, float32). :class:`OFTL1Policy` is OFT's own pipeline
(its L1 action head on its action-token hidden states, its statistics) behind the rsd Policy protocol.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rsd.backbones.base import _check_spec_kwargs, check_hidden, instructions_for_batch, register_backbone
from rsd.backbones.openvla_arch import OpenVLAModel, OpenVLAShape, enable_fast_path
from rsd.backbones.openvla_inputs import IMAGE_KEYS, PROMPT_TEMPLATE, group_by_prompt, observation_tensors, ungroup
from rsd.backbones.openvla_llama import LlamaSpec
from rsd.backbones.openvla_towers import TOWERS
from rsd.errors import (
    ActionGenerationError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    UnknownUnnormKeyError,
    WrongBaseModelError,
)
from rsd.images import center_crop_image

__all__ = [
    "OpenVLAOFTBackbone",
    "OFTL1Policy",
    "LIBERO_SUITES",
    "BASE_MODELS",
    "check_suite",
    "suites_named_in",
    "shape_from_config",
    "load_oft_state_dict",
]

LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
BASE_MODELS = ("openvla/openvla-7b", "openvla/openvla-7b-prismatic", "openvla/openvla-v01-7b")  # not LIBERO-tuned
_SUITE_WORDS = {"spatial": "libero_spatial", "object": "libero_object", "goal": "libero_goal",
                "10": "libero_10", "long": "libero_10", "90": "libero_90"}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
_COMPONENTS = {"proprio_projector": "proprio_projector", "action_head": "action_head"}  # file pattern -> module


# guard rails


def suites_named_in(name: str) -> set[str]:
    """LIBERO suites a checkpoint name claims: ``...-libero-spatial-object-goal-10`` -> four suites."""
    found: set[str] = set()
    for match in re.finditer(r"libero((?:[-_](?:spatial|object|goal|10|90|long))+)", name.lower()):
        found.update(_SUITE_WORDS[w] for w in re.split(r"[-_]", match.group(1)) if w)
    return found


def _is_base_model(name: str) -> bool:
    leaf = name.strip().rstrip("/").lower().rsplit("/", 1)[-1]
    return leaf in {base.rsplit("/", 1)[-1] for base in BASE_MODELS}


def check_suite(names: str | list[str], stats_keys: list[str], suite: str, *,
                allow_suite_mismatch: bool = False) -> list[str]:
    """Raise WrongBaseModelError when a checkpoint's names (path / hub id / config ``_name_or_path``) or
    its statistics keys say it was not fine-tuned on ``suite``; with ``allow_suite_mismatch`` return the
    problems instead."""
    if suite not in LIBERO_SUITES:
        raise ConfigError(f"unknown LIBERO suite {suite!r}; known suites: {', '.join(LIBERO_SUITES)}.")
    names = [names] if isinstance(names, str) else [n for n in names if n]
    problems = []
    for name in names:
        if _is_base_model(name):
            problems.append(f"{name!r} is an OpenVLA base model, never fine-tuned on LIBERO (0% success in the seed)")
        named = suites_named_in(name)
        if named and suite not in named:
            problems.append(f"the name {name!r} says it was fine-tuned on {sorted(named)}, not {suite!r}")
    if suite not in stats_keys and f"{suite}_no_noops" not in stats_keys:
        problems.append(f"its dataset_statistics.json has no {suite!r} or {suite + '_no_noops'!r} key "
                        f"(keys: {sorted(stats_keys)})")
    if problems and not allow_suite_mismatch:
        raise WrongBaseModelError(
            f"checkpoint {names[0]!r} does not look fine-tuned for {suite!r}: " + "; ".join(problems) +
            f". Use the OFT checkpoint for this suite (e.g. moojink/openvla-7b-oft-finetuned-"
            f"{suite.replace('_', '-')}), or pass allow_suite_mismatch=True (and unnorm_key=...) on purpose."
        )
    return problems


# checkpoint files


def _resolve_dir(path_or_id: str | os.PathLike, local_files_only: bool) -> Path:
    path = Path(os.fspath(path_or_id)).expanduser()
    if path.is_dir():
        return path.resolve()
    text = os.fspath(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointNotFoundError(f"OpenVLA-OFT checkpoint directory {path} does not exist.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=local_files_only))
    except Exception as exc:  # network / auth / missing repo: all mean "no checkpoint here"
        raise CheckpointNotFoundError(
            f"could not get {text!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). Download it where "
            f"the hub is reachable and pass the local directory (or set RSD_OPENVLA_OFT_PATH for the tests)."
        ) from exc


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} not found: {path}. An OpenVLA-OFT checkpoint directory ships it.")
    return json.loads(path.read_text())


def _text_spec(text_config: Mapping[str, Any]) -> LlamaSpec:
    """LlamaSpec from ``config.json``'s ``text_config`` with transformers' LlamaConfig defaults filled in
    (exactly what OpenVLA's own code builds with ``CONFIG_MAPPING['llama'](**text_config)``)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
    rope = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None)
    rope_type = (rope or scaling or {}).get("rope_type", "default")
    if rope_type not in ("default", None):
        raise ConfigError(f"text_config uses RoPE scaling {rope_type!r}; rsd's decoder implements plain RoPE only.")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ConfigError("text_config gives no rope_theta (neither rope_theta nor rope_parameters['rope_theta']).")
    return LlamaSpec(hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                     num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
                     intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                     rms_norm_eps=float(cfg.rms_norm_eps), rope_theta=float(theta),
                     max_positions=cfg.max_position_embeddings)


def shape_from_config(config: Mapping[str, Any], *, num_images: int) -> OpenVLAShape:
    """The module tree a ``config.json`` describes; anything rsd does not implement raises ConfigError.

    Tower sizes come from ``timm_model_ids`` (``rsd.backbones.openvla_shaped.TOWERS``: OpenVLA's DINOv2
    ViT-L/14-reg4 and SigLIP So400m/14, plus their tiny test versions)."""
    if not config.get("use_fused_vision_backbone"):
        raise ConfigError("config.json: use_fused_vision_backbone must be true (OpenVLA's DINOv2 + SigLIP towers).")
    ids = list(config.get("timm_model_ids", []))
    if len(ids) != 2 or any(i not in TOWERS for i in ids):
        raise ConfigError(f"config.json timm_model_ids {ids}: rsd implements the fused towers {sorted(TOWERS)}.")
    towers = [TOWERS[i] for i in ids]
    sizes = list(config.get("image_sizes", []))
    if sizes != [t.image_size for t in towers]:
        raise ConfigError(f"config.json image_sizes {sizes} != {[t.image_size for t in towers]} for towers {ids}.")
    overrides = [a for a in config.get("timm_override_act_layers", [None, None]) if a is not None]
    if overrides:
        raise ConfigError(f"config.json overrides the towers' activations {overrides}; rsd implements timm's defaults.")
    if "text_config" not in config:
        raise ConfigError("config.json has no text_config (the Llama decoder's config).")
    return OpenVLAShape(featurizer=towers[0], fused_featurizer=towers[1], llm=_text_spec(config["text_config"]),
                        num_images=num_images)


def _component_file(directory: Path, pattern: str) -> Path:
    found = sorted(p for p in directory.iterdir() if pattern in p.name and "checkpoint" in p.name and p.suffix == ".pt")
    if len(found) != 1:
        raise CheckpointNotFoundError(
            f"expected exactly one {pattern}--*_checkpoint.pt in {directory}, found {[p.name for p in found]}. "
            f"OFT ships the {pattern} next to the VLA weights; without it the model cannot run."
        )
    return found[0]


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of the checkpoint: the shards its index names, or ``model.safetensors``. A shard
    name whose path leaves ``directory`` once normalized (``../x.safetensors``, ``a/../../x``, an absolute path)
    is refused: an index must never make rsd read weights from elsewhere. The check is on the names, not on
    resolved links: a Hugging Face cache snapshot folder holds its files as links into the cache's ``blobs/``."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointMismatchError(f"{index} is not a safetensors index (a JSON object whose 'weight_map' "
                                          f"maps tensor names to shard files): {type(exc).__name__}: {exc}. "
                                          f"Download the checkpoint again.") from exc
        outside = [s for s in shards if not isinstance(s, str) or os.path.isabs(s)
                   or os.path.normpath(s).split(os.sep)[0] in ("..", ".")]
        if outside:
            raise CheckpointMismatchError(f"{index} names weight shards outside {directory}: {outside}. A checkpoint's "
                                          f"shards live in its own folder; download the checkpoint again.")
        return [directory / s for s in shards]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointNotFoundError(f"no model.safetensors(.index.json) in {directory}; rsd loads safetensors weights only.")


def load_oft_state_dict(directory: Path, *, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, named as in :class:`OpenVLAModel`: the VLA safetensors as-is,
    the component files under ``proprio_projector.`` / ``action_head.`` (DDP ``module.`` prefixes removed).
    Component files are read with ``torch.load(weights_only=True)`` (OFT saves them with torch.save)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        if not path.is_file():
            raise CheckpointNotFoundError(f"weight shard {path} listed in the index is missing.")
        state.update(load_file(str(path), device=str(device)))
    for pattern, prefix in _COMPONENTS.items():
        path = _component_file(directory, pattern)
        component = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(component, dict):
            raise CheckpointMismatchError(f"{path} holds a {type(component).__name__}, expected a state dict.")
        for key, value in component.items():
            state[f"{prefix}.{key.removeprefix('module.')}"] = value
    return state


def _strict_assign(model: OpenVLAModel, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(
            f"{source} does not match the OpenVLA-OFT architecture from its config.json: "
            f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected {unexpected[:6]}, "
            f"{len(reshaped)} reshaped {reshaped[:6]}. No parameter is ever initialised randomly, so every one "
            f"must be in the files; is this an OpenVLA-OFT checkpoint with both component .pt files?"
        )
    model.load_state_dict(state, strict=True, assign=True)


def _check_preprocessor(directory: Path, shape: OpenVLAShape) -> None:
    cfg = _read_json(directory / "preprocessor_config.json", "image processor config")
    towers = (shape.featurizer, shape.fused_featurizer)
    want = {"means": [list(t.mean) for t in towers], "stds": [list(t.std) for t in towers],
            "input_sizes": [[3, t.image_size, t.image_size] for t in towers]}
    for key, value in want.items():
        got = cfg.get(key)
        if got is None or not np.allclose(np.asarray(got, dtype=np.float64), np.asarray(value, dtype=np.float64)):
            raise ConfigError(f"{directory}/preprocessor_config.json {key}={got}, rsd normalizes with {value}.")
    strategy = cfg.get("image_resize_strategy")
    if strategy != "resize-naive":
        raise ConfigError(f"image_resize_strategy {strategy!r}: rsd implements 'resize-naive' (a no-op at 224 px).")


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

        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        device = torch.device(device)
        name = os.fspath(path_or_id)
        directory = _resolve_dir(path_or_id, local_files_only)
        config = _read_json(directory / "config.json", "config.json")
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
        _check_preprocessor(directory, shape)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

        with torch.device("meta"):
            model = OpenVLAModel(shape)  # no storage, no init: every tensor must come from the files
        _strict_assign(model, load_oft_state_dict(directory, device=device), label)
        model = model.to(device=device, dtype=_DTYPES[dtype]).eval().requires_grad_(False)
        on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if on_meta:
            raise CheckpointMismatchError(f"tensors left without checkpoint data: {on_meta[:6]}.")
        return cls(model, tokenizer, stats, source=name, suite=suite, unnorm_key=unnorm_key,
                   allow_suite_mismatch=allow_suite_mismatch, device=device, fast=fast, center_crop=center_crop)

    # inputs

    def prompt_ids(self, instruction: str) -> torch.Tensor:
        """OFT's prompt ids ``[T]``: ``<s>`` + the prompt + the empty token ``"▁"`` (cached per instruction)."""
        if instruction not in self._token_cache:
            prompt = PROMPT_TEMPLATE.format(instruction=instruction.lower())
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
    def encode(self, observation: dict, instruction: str | list[str]) -> torch.Tensor:
        """The RSD hidden state, float32 ``[B, 4096]`` (see :meth:`OpenVLAModel.rsd_hidden`)."""
        groups = self._groups(observation, instruction)
        hidden = ungroup([self._hidden_fn(images, ids, state) for images, ids, state, _ in groups], groups)
        return check_hidden(hidden.float(), self.hidden_dim)

    @torch.inference_mode()
    def predict_actions(self, observation: dict, instruction: str | list[str]) -> torch.Tensor:
        """OFT's L1 head: normalized actions float32 ``[B, C, A]`` (un-normalize with :attr:`action_stats`)."""
        groups = self._groups(observation, instruction)
        actions = ungroup([self._actions_fn(images, ids, state) for images, ids, state, _ in groups], groups)
        return actions.float()

    # save / load hooks (the weights stay in the checkpoint directory)

    def spec_kwargs(self) -> dict[str, Any]:
        dtype = next(k for k, v in _DTYPES.items() if v == self.model.dtype)
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


# the L1 baseline as a policy


class OFTL1Policy:
    """OpenVLA-OFT's own pipeline behind rsd's Policy protocol: its L1 head, its ``action`` statistics,
    OFT's post-processing (un-normalize without clipping, as OFT; gripper binarized and flipped to the
    env convention). ``predict_chunk(observation, instruction) -> ActionChunk`` with ``actions [C, A]``."""

    kind = "openvla-oft-l1"

    def __init__(self, backbone: OpenVLAOFTBackbone) -> None:
        from rsd.normalize import BoundsQ99Normalizer

        if not isinstance(backbone, OpenVLAOFTBackbone):
            raise ConfigError(f"OFTL1Policy needs an OpenVLAOFTBackbone, got {type(backbone).__name__}.")
        self.backbone = backbone
        self.normalizer = BoundsQ99Normalizer(backbone.action_stats)
        self.num_calls = 0

    def reset(self) -> None:
        """Stateless between chunks (the eval loop owns the action queue)."""

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> Any:
        from rsd.normalize import model_to_env_gripper
        from rsd.policy import ActionChunk

        try:
            t0 = time.perf_counter()
            normalized = self.backbone.predict_actions(dict(observation), instruction)  # [1, C, A]
            if normalized.shape[0] != 1:
                raise ConfigError(f"predict_chunk takes one observation, got a batch of {normalized.shape[0]}.")
            actions = self.normalizer.unnormalize(normalized[0].cpu().numpy())
            actions[:, -1] = model_to_env_gripper(actions[:, -1])
            self.num_calls += 1
            info = {"policy": self.kind, "used_rfsq": False, "unnorm_key": self.backbone.unnorm_key,
                    "timing_ms": {"total_ms": 1e3 * (time.perf_counter() - t0)}, "num_calls": self.num_calls}
            return ActionChunk(actions=actions.astype(np.float32), info=info)
        except Exception as exc:  # every failure surfaces, typed, with its cause; no action is returned
            raise ActionGenerationError(f"OFTL1Policy failed for {instruction!r}: {type(exc).__name__}: {exc}") from exc

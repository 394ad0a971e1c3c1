"""OpenVLA-OFT checkpoint folders: the guard rails that refuse the wrong model, and the strict file loading.

Guard rails (:class:`~rsd.errors.WrongBaseModelError` unless ``allow_suite_mismatch=True``): the base
``openvla/openvla-7b`` (never trained on LIBERO), a checkpoint whose name names other LIBERO suites than the
requested one (``...-libero-spatial`` for ``libero_object``), or one whose ``dataset_statistics.json`` has no
key for the suite (:func:`check_suite`).

Files: ``config.json`` -> the module tree (:func:`shape_from_config`, anything rsd does not implement is a
ConfigError); the VLA safetensors (shards confined to the folder) and OFT's component ``.pt`` files ->
one state dict named as :class:`~rsd.backbones.openvla_arch.OpenVLAModel` (:func:`load_oft_state_dict`);
:func:`strict_assign` puts every tensor in place or raises CheckpointMismatchError naming what is missing,
unexpected or reshaped.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rsd.backbones.openvla_arch import OpenVLAModel, OpenVLAShape
from rsd.backbones.openvla_llama import LlamaSpec
from rsd.backbones.openvla_towers import TOWERS
from rsd.checkpoint import load_safetensors
from rsd.checkpoint import read_json as read_json_object
from rsd.errors import (CheckpointMismatchError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError,
                        WrongBaseModelError)
from rsd.suites import LIBERO_SUITES

__all__ = ["BASE_MODELS", "DTYPES", "check_suite", "suites_named_in", "resolve_checkpoint_dir", "read_json",
           "shape_from_config", "load_oft_state_dict", "strict_assign", "check_preprocessor"]

BASE_MODELS = ("openvla/openvla-7b", "openvla/openvla-7b-prismatic", "openvla/openvla-v01-7b")  # not LIBERO-tuned
_SUITE_WORDS = {"spatial": "libero_spatial", "object": "libero_object", "goal": "libero_goal",
                "10": "libero_10", "long": "libero_10", "90": "libero_90"}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
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
            problems.append(f"{name!r} is an OpenVLA base model, never fine-tuned on LIBERO (about 0% success there)")
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


def resolve_checkpoint_dir(path_or_id: str | os.PathLike, local_files_only: bool) -> Path:
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


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object of the checkpoint folder: CheckpointNotFoundError when it is missing, CheckpointMismatchError
    naming the file when it is cut, not UTF-8 JSON or not an object (``rsd.checkpoint.read_json``)."""
    return read_json_object(path, what=what, hint="An OpenVLA-OFT checkpoint directory ships it; download the "
                                                  "checkpoint again.")


def text_spec(text_config: Mapping[str, Any]) -> LlamaSpec:
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

    Tower sizes come from ``timm_model_ids`` (``rsd.backbones.openvla_towers.TOWERS``: OpenVLA's DINOv2
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
    return OpenVLAShape(featurizer=towers[0], fused_featurizer=towers[1], llm=text_spec(config["text_config"]),
                        num_images=num_images)


def component_file(directory: Path, pattern: str) -> Path:
    found = sorted(p for p in directory.iterdir() if pattern in p.name and "checkpoint" in p.name and p.suffix == ".pt")
    if len(found) != 1:
        raise CheckpointNotFoundError(
            f"expected exactly one {pattern}--*_checkpoint.pt in {directory}, found {[p.name for p in found]}. "
            f"OFT ships the {pattern} next to the VLA weights; without it the model cannot run."
        )
    return found[0]


def weight_files(directory: Path) -> list[Path]:
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
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        state.update(load_safetensors(path, what="OpenVLA-OFT weight shard", device=str(device),
                                      hint="Download the checkpoint again (every shard its index lists)."))
    for pattern, prefix in _COMPONENTS.items():
        path = component_file(directory, pattern)
        try:
            component = torch.load(path, map_location=device, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
            raise CorruptCheckpointError(
                f"OFT component {path} ({path.stat().st_size} bytes) cannot be read as a torch state dict "
                f"({type(exc).__name__}: {exc}): it is truncated or corrupt. Download the checkpoint again.") from exc
        if not isinstance(component, dict):
            raise CheckpointMismatchError(f"{path} holds a {type(component).__name__}, expected a state dict.")
        for key, value in component.items():
            state[f"{prefix}.{key.removeprefix('module.')}"] = value
    return state


def strict_assign(model: OpenVLAModel, state: dict[str, torch.Tensor], source: str) -> None:
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


def check_preprocessor(directory: Path, shape: OpenVLAShape) -> None:
    cfg = read_json(directory / "preprocessor_config.json", "image processor config")
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

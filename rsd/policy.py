"""Policies: observation + instruction -> an env-ready action chunk.

Every policy (RSD, the L1 baseline, the scripted experts, anything learned) implements one protocol,
:class:`Policy`. The simulation code talks to policies only through it and never imports model internals.

The RSD inference path (the seed's intended ``generate_action``, made loud)::

    hidden [1, D]   = backbone.encode(observation, instruction)          # checked: finite, not all zero
    codes [1,C,H,L] = SpeculativeDecoder(draft, head).decode(hidden)      # or greedy_decode(head, hidden)
    norm [1, C, A]  = tokenizer.decode_from_indices(codes)               # checked: finite
    actions [C, A]  = unnormalize(clip(norm, -1, 1)); gripper model [0,1] -> env {-1 open, +1 close}

Any failure raises :class:`rsd.errors.ActionGenerationError` with the cause attached; no action is returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
from einops import rearrange

from rsd.checkpoint import load_module, read_json, save_module, write_json
from rsd.config import RSDConfig
from rsd.errors import (ActionGenerationError, CheckpointMismatchError, CheckpointNotFoundError, ConfigError,
                        DTypeError, NonFiniteError, ShapeError)
from rsd.normalize import BoundsQ99Normalizer, NormStats, model_to_env_gripper
from rsd.speculative import SpeculativeDecoder, greedy_decode

__all__ = ["ActionChunk", "Policy", "RSDPolicy", "L1Policy", "load_policy", "fast_plan", "FastPlan"]

POLICY_FORMAT = 1


@dataclass(frozen=True)
class ActionChunk:
    """``actions``: float32 ``[C, A]``, env-ready (un-normalized; gripper -1 open / +1 close). ``info``: plain data."""

    actions: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        actions = self.actions
        if not isinstance(actions, np.ndarray):
            raise DTypeError(f"ActionChunk.actions must be a numpy array, got {type(actions).__name__}.")
        if actions.ndim != 2:
            raise ShapeError(f"ActionChunk.actions must be [C, A], got shape {actions.shape}.")
        if actions.dtype != np.float32:
            raise DTypeError(f"ActionChunk.actions must be float32, got {actions.dtype}.")
        if not np.isfinite(actions).all():
            raise NonFiniteError("ActionChunk.actions contain NaN/inf.")


@runtime_checkable
class Policy(Protocol):
    """The one interface between policies and the simulator."""

    def reset(self) -> None:
        """Called at the start of every episode."""

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        """Return the next open-loop chunk of env-ready actions."""


# ----------------------------------------------------------------------------------------------------------------
# shared machinery of the learned policies


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _LearnedPolicy:
    """Backbone -> hidden -> (subclass: normalized chunk) -> un-normalize -> gripper -> ActionChunk."""

    kind: str = ""

    def __init__(self, backbone: Any, config: RSDConfig, action_stats: NormStats, *, device: str | torch.device = "cpu",
                 unnorm_key: str | None = None) -> None:
        if action_stats.dim != config.action_dim:
            raise ShapeError(f"action statistics have {action_stats.dim} dims, config.action_dim is {config.action_dim}.")
        hidden_dim = getattr(backbone, "hidden_dim", None)
        if hidden_dim != config.hidden_dim:
            raise ConfigError(f"backbone.hidden_dim={hidden_dim} but config.hidden_dim={config.hidden_dim}: "
                              f"the heads were built for another backbone.")
        self.backbone = backbone
        self.config = config
        self.action_stats = action_stats
        self.normalizer = BoundsQ99Normalizer(action_stats)
        self.unnorm_key = unnorm_key
        self.device = torch.device(device)
        self.num_calls = 0

    # -- the protocol ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Stateless between chunks: nothing to clear (the eval loop owns the action queue)."""

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        try:
            return self._predict_chunk(observation, instruction)
        except Exception as exc:  # every failure surfaces, typed, with its cause; no action is returned
            raise ActionGenerationError(
                f"{type(self).__name__} failed to generate an action chunk for {instruction!r}: "
                f"{type(exc).__name__}: {exc}") from exc

    def generate_action(self, observation: Mapping[str, Any], task_description: str) -> tuple[np.ndarray, dict]:
        """The seed's entry point: ``(actions [C, A], info)``."""
        chunk = self.predict_chunk(observation, task_description)
        return chunk.actions, chunk.info

    # -- pieces ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        from rsd.backbones.base import check_hidden

        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        hidden = self.backbone.encode(observation, instruction)
        hidden, hidden_norm = check_hidden(hidden, self.config.hidden_dim, return_norm=True)  # one host sync
        hidden = hidden.to(self.device, torch.float32)
        if hidden.shape[0] != 1:
            raise ShapeError(f"predict_chunk takes one observation; the backbone returned a batch of {hidden.shape[0]}.")
        t1 = time.perf_counter()  # check_hidden's read-back has waited for the backbone
        timing["backbone_ms"] = 1e3 * (t1 - t0)

        norm, info = self._normalized_chunk(hidden, timing)  # [1, C, A]
        t2 = time.perf_counter()
        norm_np = norm[0].detach().to("cpu", torch.float32).numpy()
        if not np.isfinite(norm_np).all():
            raise NonFiniteError("the decoded action chunk contains NaN/inf.")
        actions = self.postprocess(norm_np)
        timing["postprocess_ms"] = 1e3 * (time.perf_counter() - t2)
        timing["total_ms"] = 1e3 * (time.perf_counter() - t0)
        self.num_calls += 1

        info.update({
            "policy": self.kind,
            "timing_ms": timing,
            "hidden_shape": list(hidden.shape),
            "hidden_norm": hidden_norm,
            "action_min": float(actions.min()),
            "action_max": float(actions.max()),
            "first_action": actions[0].tolist(),
            "num_calls": self.num_calls,
        })
        return ActionChunk(actions=actions, info=info)

    def postprocess(self, normalized: np.ndarray) -> np.ndarray:
        """Normalized ``[C, A]`` -> env-ready ``[C, A]``: clip to [-1, 1], un-normalize, gripper to env convention."""
        if normalized.shape != (self.config.chunk_len, self.config.action_dim):
            raise ShapeError(f"decoded chunk has shape {normalized.shape}, expected "
                             f"({self.config.chunk_len}, {self.config.action_dim}).")
        actions = self.normalizer.unnormalize(np.clip(normalized, -1.0, 1.0))
        actions[:, -1] = model_to_env_gripper(actions[:, -1])
        return actions.astype(np.float32)

    def _normalized_chunk(self, hidden: torch.Tensor, timing: dict[str, float]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # -- persistence -------------------------------------------------------------------------------------------
    def _save_common(self, directory: Path, extra: dict[str, Any]) -> None:
        from rsd.backbones import save_backbone

        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": POLICY_FORMAT,
            "kind": self.kind,
            "config": self.config.to_dict(),
            "backbone": save_backbone(self.backbone, directory),
            "action_stats": self.action_stats.to_dict(),
            "unnorm_key": self.unnorm_key,
            **extra,
        }
        write_json(directory / "policy.json", meta)

    @staticmethod
    def _load_meta(directory: Path, kind: str) -> dict[str, Any]:
        meta = _policy_json(directory, hint="A policy directory is written by `save_pretrained(dir)`.")
        if meta.get("kind") != kind:
            raise ConfigError(f"{directory} holds a {meta.get('kind')!r} policy, not {kind!r}; use rsd.policy.load_policy.")
        if meta.get("format") != POLICY_FORMAT:
            raise ConfigError(f"{directory}: policy format {meta.get('format')!r}, this rsd reads {POLICY_FORMAT}.")
        return meta


def _code_histogram(codes: torch.Tensor, num_levels: int) -> np.ndarray:
    """Counts of each level per layer, ``[L, G]``, from codes ``[1, C, H, L]`` in ``[0, G)`` (the seed's 'are
    all indices equal?'): one bincount over ``layer * G + code``."""
    per_layer = rearrange(codes[0].numpy(), "c h l -> (c h) l")
    num_layers = per_layer.shape[1]
    flat = (np.arange(num_layers) * num_levels + per_layer).ravel()
    return np.bincount(flat, minlength=num_layers * num_levels).reshape(num_layers, num_levels)


# ----------------------------------------------------------------------------------------------------------------
# RSD: RFSQ head (+ draft) + tokenizer


class RSDPolicy(_LearnedPolicy):
    """Backbone + RFSQ head (+ draft for speculative decoding) + RFSQ tokenizer + normalizer."""

    kind = "rsd"

    def __init__(self, backbone: Any, head: torch.nn.Module, tokenizer: torch.nn.Module, action_stats: NormStats, *,
                 config: RSDConfig, draft: torch.nn.Module | None = None, speculative: bool | None = None,
                 mode: str = "exact", threshold: float | None = None, device: str | torch.device = "cpu",
                 unnorm_key: str | None = None, graphed: bool = False, compile_heads: bool = False) -> None:
        super().__init__(backbone, config, action_stats, device=device, unnorm_key=unnorm_key)
        tok_cfg = tokenizer.config
        expected = dict(chunk_len=config.chunk_len, action_dim=config.action_dim, latent_dim=config.latent_dim,
                        num_layers=config.num_layers, num_levels=config.num_levels)
        diffs = {k: (tok_cfg.get(k), v) for k, v in expected.items() if tok_cfg.get(k) != v}
        if diffs:
            raise ConfigError(f"tokenizer does not match the policy config (tokenizer, config): {diffs}.")
        if speculative and draft is None:
            raise ConfigError("speculative=True needs a draft head; pass draft=DraftHead(...) or speculative=False.")
        self.head = head.to(self.device).eval()
        self.draft = draft.to(self.device).eval() if draft is not None else None
        self.tokenizer = tokenizer.to(self.device).eval()
        self.speculative = (draft is not None) if speculative is None else bool(speculative)
        self.mode, self.threshold = mode, threshold
        self._decoder = None
        self._graphed = None
        if compile_heads and not graphed:
            raise ConfigError("compile_heads=True compiles the graphed decoder: pass graphed=True as well.")
        if self.speculative:
            self._decoder = SpeculativeDecoder(self.draft, self.head, mode=mode, threshold=threshold)
        if graphed:
            self.use_graphed_heads(compile=compile_heads)

    def use_graphed_heads(self, *, compile: bool = False) -> None:
        """From now on run greedy heads + argmax + layout + decode as one CUDA graph (rsd.fastpath): bit-equal
        to greedy_decode, or with ``compile`` codes that are eager's argmax up to float-rounding ties
        (``fastpath.argmax_regret``). ConfigError on a non-CUDA device or for a speculative policy."""
        if self.device.type != "cuda" or self.speculative:
            raise ConfigError("graphed heads need a CUDA device and speculative=False (the graph is greedy); this "
                              f"policy is on {self.device}, speculative={self.speculative}.")
        from rsd.fastpath import GraphedRSDDecoder

        self._graphed = GraphedRSDDecoder(self.head, self.tokenizer, device=self.device, compile=compile)

    def _normalized_chunk(self, hidden: torch.Tensor, timing: dict[str, float]) -> tuple[torch.Tensor, dict]:
        info: dict[str, Any] = {"used_rfsq": True, "speculative": self.speculative, "graphed": self._graphed is not None}
        t0 = time.perf_counter()
        if self._graphed is not None:  # tokens + detokenize in one graph, results on the host after one sync
            codes, norm = self._graphed.decode_to_host(hidden)
            timing["tokens_and_detokenize_ms"] = 1e3 * (time.perf_counter() - t0)
        else:
            if self._decoder is not None:
                codes, stats = self._decoder.decode(hidden)
                info["spec_stats"] = stats.to_dict()
            else:
                codes = greedy_decode(self.head, hidden)
            _sync(self.device)
            t1 = time.perf_counter()
            norm = self.tokenizer.decode_from_indices(codes)  # [1, C, A]
            _sync(self.device)
            timing["tokens_ms"] = 1e3 * (t1 - t0)
            timing["detokenize_ms"] = 1e3 * (time.perf_counter() - t1)
        codes_cpu = codes.to("cpu")  # one device->host copy for all diagnostics
        info["codes_shape"] = list(codes_cpu.shape)
        histogram = _code_histogram(codes_cpu, self.config.num_levels)  # [L, G]
        info["code_histogram"] = histogram.tolist()
        info["distinct_codes"] = int((histogram.sum(axis=0) > 0).sum())
        return norm, info

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self._save_common(directory, {"speculative": {"enabled": self.speculative, "mode": self.mode,
                                                      "threshold": self.threshold,
                                                      "has_draft": self.draft is not None}})
        save_module(self.head, directory / "head.safetensors")
        if self.draft is not None:
            save_module(self.draft, directory / "draft.safetensors")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu",
                        speculative: bool | None = None, mode: str | None = None,
                        threshold: float | None = None, graphed: bool = False,
                        compile_heads: bool = False, trust_remote_code: bool = False) -> "RSDPolicy":
        from rsd.backbones import load_backbone
        from rsd.heads import DraftHead, RFSQHead
        from rsd.tokenizer import RFSQTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointNotFoundError(f"policy directory {directory} does not exist.")
        meta = cls._load_meta(directory, cls.kind)
        config = RSDConfig.from_dict(meta["config"])
        head = load_module(RFSQHead(config), directory / "head.safetensors", what="RFSQ head weights",
                           hint="Cannot run RSD without its trained RFSQ head; train one or point at the right directory.")
        spec = meta.get("speculative", {})
        draft = None
        if spec.get("has_draft"):
            draft = load_module(DraftHead(config), directory / "draft.safetensors", what="draft head weights",
                                hint="policy.json says this policy has a draft head, but its weights are missing.")
        tokenizer = RFSQTokenizer.from_pretrained(directory / "tokenizer")
        backbone = load_backbone(meta["backbone"], directory, device=device, trust_remote_code=trust_remote_code)
        return cls(backbone, head, tokenizer, NormStats.from_dict(meta["action_stats"]), config=config, draft=draft,
                   speculative=_saved_speculative(meta) if speculative is None else speculative,
                   mode=mode or spec.get("mode", "exact"),
                   threshold=threshold if threshold is not None else spec.get("threshold"),
                   device=device, unnorm_key=meta.get("unnorm_key"), graphed=graphed, compile_heads=compile_heads)


# ----------------------------------------------------------------------------------------------------------------
# L1 regression baseline


class L1Policy(_LearnedPolicy):
    """Backbone + L1-regression action head (the OpenVLA-OFT baseline) + normalizer."""

    kind = "l1"

    def __init__(self, backbone: Any, head: torch.nn.Module, action_stats: NormStats, *, config: RSDConfig,
                 device: str | torch.device = "cpu", unnorm_key: str | None = None) -> None:
        super().__init__(backbone, config, action_stats, device=device, unnorm_key=unnorm_key)
        self.head = head.to(self.device).eval()

    def _normalized_chunk(self, hidden: torch.Tensor, timing: dict[str, float]) -> tuple[torch.Tensor, dict]:
        t0 = time.perf_counter()
        norm = self.head(hidden)  # [1, C, A]
        _sync(self.device)
        timing["head_ms"] = 1e3 * (time.perf_counter() - t0)
        return norm, {"used_rfsq": False}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self._save_common(directory, {})
        save_module(self.head, directory / "head.safetensors")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu",
                        trust_remote_code: bool = False) -> "L1Policy":
        from rsd.backbones import load_backbone
        from rsd.heads import L1ActionHead

        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointNotFoundError(f"policy directory {directory} does not exist.")
        meta = cls._load_meta(directory, cls.kind)
        config = RSDConfig.from_dict(meta["config"])
        head = load_module(L1ActionHead(config), directory / "head.safetensors", what="L1 action head weights",
                           hint="Cannot run the L1 baseline without its trained action head.")
        backbone = load_backbone(meta["backbone"], directory, device=device, trust_remote_code=trust_remote_code)
        return cls(backbone, head, NormStats.from_dict(meta["action_stats"]), config=config, device=device,
                   unnorm_key=meta.get("unnorm_key"))


_KINDS: dict[str, type[_LearnedPolicy]] = {cls.kind: cls for cls in (RSDPolicy, L1Policy)}


@dataclass(frozen=True)
class FastPlan:
    """What ``fast=True`` does to a saved policy: graph its RSD heads, and/or put its backbone on its fast path."""

    graph_heads: bool
    backbone: bool


def _saved_speculative(meta: Mapping[str, Any]) -> bool:
    """Whether a saved RSD policy decodes speculatively: as saved, else RSDPolicy's default (when it has a draft)."""
    spec = meta.get("speculative", {})
    enabled = spec.get("enabled")
    return bool(spec.get("has_draft")) if enabled is None else bool(enabled)


_META_KEYS = ("format", "kind", "config", "backbone", "action_stats")  # what save_pretrained always writes


def _policy_json(directory: Path, *, hint: str) -> dict[str, Any]:
    """``directory/policy.json`` as a dict holding every key ``save_pretrained`` writes (CheckpointMismatchError
    naming the file and the missing keys otherwise; ``read_json`` refuses invalid JSON and non-objects)."""
    meta = read_json(directory / "policy.json", what="policy description", hint=hint)
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointMismatchError(f"{directory / 'policy.json'} lacks {missing}: it was not written by "
                                      f"save_pretrained, or it was edited. {hint}")
    return meta


def _read_meta(directory: Path) -> dict[str, Any]:
    meta = _policy_json(directory, hint="Expected a directory written by RSDPolicy/L1Policy.save_pretrained.")
    if meta.get("kind") not in _KINDS:
        raise ConfigError(f"{directory}: unknown policy kind {meta.get('kind')!r}; known kinds: {sorted(_KINDS)}.")
    return meta


def fast_plan(directory: str | Path) -> FastPlan:
    """Read ``directory/policy.json`` and say what ``load_policy(directory, fast=True)`` will speed up, without
    loading anything. ConfigError for an unknown kind, and for a policy with nothing on a fast path (a
    speculative or L1 policy whose backbone has no ``set_fast``)."""
    directory = Path(directory)
    return _fast_plan(_read_meta(directory), directory)


def _fast_plan(meta: Mapping[str, Any], directory: Path) -> FastPlan:
    from rsd.backbones.base import backbone_class

    kind = meta["kind"]
    backbone_cls = backbone_class(meta.get("backbone", {}).get("name", ""))
    plan = FastPlan(graph_heads=kind == RSDPolicy.kind and not _saved_speculative(meta),
                    backbone=hasattr(backbone_cls, "set_fast"))
    if not (plan.graph_heads or plan.backbone):
        what = "decodes speculatively (kept: the graphed decoder is greedy-only)" if kind == RSDPolicy.kind \
            else f"is a {kind!r} policy (its head is not graphed)"
        raise ConfigError(f"fast=True has nothing to speed up in {directory}: the policy {what} and its "
                          f"{backbone_cls.__name__} has no fast path (set_fast). Drop --fast / fast=True.")
    return plan


def load_policy(directory: str | Path, *, device: str | torch.device = "cpu", fast: bool = False,
                trust_remote_code: bool = False) -> _LearnedPolicy:
    """Load any saved learned policy (RSD or L1) from ``directory`` by the kind in its ``policy.json``.

    ``fast`` (CUDA ``device`` only) puts what has one on rsd's fast path (:func:`fast_plan`): a backbone with
    ``set_fast`` gets ``set_fast(True, compile=True)``; an RSD policy that decodes greedily gets
    ``use_graphed_heads(compile=True)`` (one compiled CUDA graph; codes = eager's argmax up to float-rounding
    ties). A speculative RSD policy keeps its speculative decoder (``fast`` never changes the decoding mode).
    ConfigError for a non-CUDA device, and for a policy with nothing on a fast path, before loading.

    ``trust_remote_code`` is the only switch that lets a backbone run its checkpoint's own Python code: a
    ``policy.json`` asking for it raises RemoteCodeNotAllowedError unless it is True.
    """
    directory = Path(directory)
    if fast and torch.device(device).type != "cuda":
        raise ConfigError(f"fast=True runs the policy through CUDA graphs and needs a CUDA device, got {device}: "
                          f"load it on cuda or pass fast=False (rsd eval: --device cuda, or drop --fast).")
    meta = _read_meta(directory)
    plan = _fast_plan(meta, directory) if fast else FastPlan(graph_heads=False, backbone=False)
    policy = _KINDS[meta["kind"]].from_pretrained(directory, device=device, trust_remote_code=trust_remote_code)
    if plan.graph_heads:
        policy.use_graphed_heads(compile=True)
    if plan.backbone:
        policy.backbone.set_fast(True, compile=True)
    return policy

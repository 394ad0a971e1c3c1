"""rsd's learned policies: backbone -> hidden state -> head(s) -> normalized chunk -> env-ready ActionChunk.

The RSD inference path (:class:`RSDPolicy`)::

    hidden [1, D]   = backbone.encode(observation, instruction, check=False)  # checked once, here: finite
    codes [1,C,H,L] = SpeculativeDecoder(draft, head).decode(hidden)          # or greedy_decode(head, hidden)
    norm [1, C, A]  = tokenizer.decode_from_indices(codes)                   # checked: finite
    actions [C, A]  = ActionPostprocessor(stats)(norm[0])                    # clip, un-normalize, gripper -> env

:class:`L1Policy` replaces the RFSQ head, argmax and decode by one L1-regression head (``[1, C, A]``).
The hidden state is validated once per chunk, at this boundary (``check_hidden``: one host sync on a GPU);
the heads and decoders behind it trust it. Any failure raises :class:`rsd.errors.ActionGenerationError`
with the cause attached; no action is returned. Saved with ``save_pretrained(dir)``; ``rsd.policy.load_policy``
loads any of them by the kind in ``policy.json``.

Several episodes at once (``rsd eval --backend batched``): ``predict_chunks(observations, instructions, slots)`` runs
the same path on a batch (hidden ``[B, D]``, codes ``[B, C, H, L]``, one chunk per row; ``rsd.policy.batching``
stacks the rows), each row checked and reported on its own; ``reset_slot(slot)`` starts a slot's new episode.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from einops import rearrange

from rsd.backbones.base import check_hidden
from rsd.checkpoint import load_module, read_json, save_module, write_json
from rsd.config import RSDConfig
from rsd.errors import ActionGenerationError, CheckpointMismatchError, CheckpointNotFoundError, ConfigError, ShapeError
from rsd.normalize import BOUNDS_Q99, NORMALIZATIONS, NormStats
from rsd.policy.batching import BatchedPrediction
from rsd.policy.greedy_check import compare_rows_with_greedy
from rsd.policy.postprocess import ActionPostprocessor
from rsd.policy.protocol import ActionChunk
from rsd.speculative import SpeculativeDecoder, greedy_decode

__all__ = ["RSDPolicy", "L1Policy", "KINDS", "POLICY_FORMAT", "read_policy_meta", "saved_speculative"]

POLICY_FORMAT = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _LearnedPolicy(BatchedPrediction):
    """Backbone -> hidden -> (subclass: normalized chunk) -> un-normalize -> gripper -> ActionChunk."""

    kind: str = ""

    def __init__(self, backbone: Any, config: RSDConfig, action_stats: NormStats, *, device: str | torch.device = "cpu",
                 unnorm_key: str | None = None, action_normalization: str = BOUNDS_Q99) -> None:
        if action_stats.dim != config.action_dim:
            raise ShapeError(f"action statistics have {action_stats.dim} dims, config.action_dim is {config.action_dim}.")
        hidden_dim = getattr(backbone, "hidden_dim", None)
        if hidden_dim != config.hidden_dim:
            raise ConfigError(f"backbone.hidden_dim={hidden_dim} but config.hidden_dim={config.hidden_dim}: "
                              f"the heads were built for another backbone.")
        self.backbone = backbone
        self.config = config
        self.action_stats = action_stats
        self.postprocessor = ActionPostprocessor(action_stats, clip=True, normalization=action_normalization)
        self.unnorm_key = unnorm_key
        self.device = torch.device(device)
        self.num_calls = 0

    @property
    def action_normalization(self) -> str:
        """How ``action_stats`` un-normalize (``rsd.normalize``): the tokenizer's / training data's kind."""
        return self.postprocessor.normalizer.normalization

    # -- the protocol ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """A new episode: a backbone with history (``LowDimBackbone(motion=True)``) forgets the previous chunk.
        The heads are stateless between chunks (the eval loop owns the action queue)."""
        backbone_reset = getattr(self.backbone, "reset", None)
        if callable(backbone_reset):
            backbone_reset()

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        try:
            return self._predict_chunk(observation, instruction)
        except Exception as exc:  # every failure surfaces, typed, with its cause; no action is returned
            raise self._generation_error(instruction, exc) from exc

    def generate_action(self, observation: Mapping[str, Any], task_description: str) -> tuple[np.ndarray, dict]:
        """OpenVLA-style entry point: ``(actions [C, A], info)``."""
        chunk = self.predict_chunk(observation, task_description)
        return chunk.actions, chunk.info

    # -- pieces ------------------------------------------------------------------------------------------------
    def _generation_error(self, instruction: str, exc: Exception) -> ActionGenerationError:
        error = ActionGenerationError(f"{type(self).__name__} failed to generate an action chunk for {instruction!r}: "
                                      f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    @torch.inference_mode()
    def _predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        hidden = self.backbone.encode(observation, instruction, check=False)
        hidden, hidden_norm = check_hidden(hidden, self.config.hidden_dim, return_norm=True)  # the one check, one sync
        hidden = hidden.to(self.device, torch.float32)
        if hidden.shape[0] != 1:
            raise ShapeError(f"predict_chunk takes one observation; the backbone returned a batch of {hidden.shape[0]}.")
        timing["backbone_ms"] = 1e3 * (time.perf_counter() - t0)  # check_hidden's read-back waited for the backbone
        [chunk] = self._chunks(hidden, [hidden_norm], timing, t0)
        if isinstance(chunk, Exception):
            raise chunk
        return chunk

    def postprocess(self, normalized: np.ndarray) -> np.ndarray:
        """Normalized ``[C, A]`` -> env-ready ``[C, A]`` (``ActionPostprocessor``: clip, un-normalize, gripper)."""
        if normalized.shape != (self.config.chunk_len, self.config.action_dim):
            raise ShapeError(f"decoded chunk has shape {normalized.shape}, expected "
                             f"({self.config.chunk_len}, {self.config.action_dim}).")
        return self.postprocessor(normalized)

    def _normalized_chunks(self, hidden: torch.Tensor, timing: dict[str, float]
                           ) -> tuple[torch.Tensor, list[dict[str, Any] | Exception]]:
        """hidden [B, D] -> (normalized chunks [B, C, A], per row its ``info`` or the exception that row raised)."""
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
            "action_normalization": self.action_normalization,
            "unnorm_key": self.unnorm_key,
            **extra,
        }
        write_json(directory / "policy.json", meta)

    @classmethod
    def _open_saved(cls, directory: str | Path) -> tuple[Path, dict[str, Any], RSDConfig]:
        """A saved policy directory of this kind -> (directory, its policy.json, its RSDConfig)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointNotFoundError(f"policy directory {directory} does not exist.")
        meta = cls._load_meta(directory, cls.kind)
        return directory, meta, RSDConfig.from_dict(meta["config"])

    @staticmethod
    def _load_meta(directory: Path, kind: str) -> dict[str, Any]:
        meta = _policy_json(directory, hint="A policy directory is written by `save_pretrained(dir)`.")
        if meta.get("kind") != kind:
            raise ConfigError(f"{directory} holds a {meta.get('kind')!r} policy, not {kind!r}; use rsd.policy.load_policy.")
        if meta.get("format") != POLICY_FORMAT:
            raise ConfigError(f"{directory}: policy format {meta.get('format')!r}, this rsd reads {POLICY_FORMAT}.")
        # policies saved before the key existed were all BOUNDS_Q99
        normalization = meta.setdefault("action_normalization", BOUNDS_Q99)
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"{directory}/policy.json: action_normalization {normalization!r} is not one of "
                              f"{list(NORMALIZATIONS)}; the file is corrupt or from a newer rsd.")
        return meta


def _code_histogram(codes: torch.Tensor, num_levels: int) -> np.ndarray:
    """Counts of each level per layer, ``[L, G]``, from codes ``[1, C, H, L]`` in ``[0, G)`` (a collapsed
    head shows as one level per layer): one bincount over ``layer * G + code``."""
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
                 unnorm_key: str | None = None, graphed: bool = False, compile_heads: bool = False,
                 check_greedy: bool = False, action_normalization: str = BOUNDS_Q99) -> None:
        super().__init__(backbone, config, action_stats, device=device, unnorm_key=unnorm_key,
                         action_normalization=action_normalization)
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
        if check_greedy and not self.speculative:
            raise ConfigError("check_greedy=True compares speculative codes with greedy decoding, and this policy "
                              "decodes greedily: pass speculative=True (with a draft head) or check_greedy=False.")
        self.check_greedy = bool(check_greedy)  # rsd.policy.greedy_check: every chunk also decoded greedily
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

    def _normalized_chunks(self, hidden: torch.Tensor, timing: dict[str, float]
                           ) -> tuple[torch.Tensor, list[dict[str, Any] | Exception]]:
        base = {"used_rfsq": True, "speculative": self.speculative, "graphed": self._graphed is not None}
        infos: list[dict[str, Any] | Exception] = [dict(base) for _ in range(hidden.shape[0])]
        t0 = time.perf_counter()
        if self._graphed is not None:  # tokens + detokenize in one graph, results on the host after one sync
            codes, norm = self._graphed.decode_to_host(hidden)
            timing["tokens_and_detokenize_ms"] = 1e3 * (time.perf_counter() - t0)
        else:
            if self._decoder is not None:
                codes, stats = self._decoder.decode(hidden)
                for i, info in enumerate(infos):
                    info["spec_stats"] = stats.row(i).to_dict()  # type: ignore[index]
                if self.check_greedy:  # outside tokens_ms; its own time is greedy_check_ms
                    t_check = time.perf_counter()
                    checks = compare_rows_with_greedy(self.head, hidden, codes, self._decoder.mode)
                    timing["greedy_check_ms"] = 1e3 * (time.perf_counter() - t_check)
                    t0 += time.perf_counter() - t_check
                    for i, check in enumerate(checks):  # a row refused by the check (exact) gets its error
                        infos[i] = check if isinstance(check, Exception) else {**infos[i], "greedy_check": check}
            else:
                codes = greedy_decode(self.head, hidden)
            _sync(self.device)
            t1 = time.perf_counter()
            norm = self.tokenizer.decode_from_indices(codes)  # [B, C, A]
            _sync(self.device)
            timing["tokens_ms"] = 1e3 * (t1 - t0)
            timing["detokenize_ms"] = 1e3 * (time.perf_counter() - t1)
        codes_cpu = codes.to("cpu")  # one device->host copy for all diagnostics
        for i, info in enumerate(infos):
            if isinstance(info, dict):
                row = codes_cpu[i: i + 1]  # [1, C, H, L]
                histogram = _code_histogram(row, self.config.num_levels)  # [L, G]
                info.update(codes_shape=list(row.shape), code_histogram=histogram.tolist(),
                            distinct_codes=int((histogram.sum(axis=0) > 0).sum()))
        return norm, infos

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
                        threshold: float | None = None, graphed: bool = False, compile_heads: bool = False,
                        trust_remote_code: bool = False, check_greedy: bool = False) -> "RSDPolicy":
        """Load a saved RSD policy; ``speculative``/``mode``/``threshold`` override how it was saved to decode
        (a ``mode`` given here comes with its own ``threshold``: the saved threshold belongs to the saved mode)."""
        from rsd.backbones import load_backbone
        from rsd.heads import DraftHead, RFSQHead
        from rsd.tokenizer import RFSQTokenizer

        directory, meta, config = cls._open_saved(directory)
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
                   speculative=saved_speculative(meta) if speculative is None else speculative,
                   mode=mode or spec.get("mode", "exact"),
                   threshold=threshold if threshold is not None or mode is not None else spec.get("threshold"),
                   device=device, unnorm_key=meta.get("unnorm_key"), graphed=graphed, compile_heads=compile_heads,
                   check_greedy=check_greedy, action_normalization=meta["action_normalization"])


# ----------------------------------------------------------------------------------------------------------------
# L1 regression baseline


class L1Policy(_LearnedPolicy):
    """Backbone + L1-regression action head (the OpenVLA-OFT baseline) + normalizer."""

    kind = "l1"

    def __init__(self, backbone: Any, head: torch.nn.Module, action_stats: NormStats, *, config: RSDConfig,
                 device: str | torch.device = "cpu", unnorm_key: str | None = None,
                 action_normalization: str = BOUNDS_Q99) -> None:
        super().__init__(backbone, config, action_stats, device=device, unnorm_key=unnorm_key,
                         action_normalization=action_normalization)
        self.head = head.to(self.device).eval()

    def _normalized_chunks(self, hidden: torch.Tensor, timing: dict[str, float]
                           ) -> tuple[torch.Tensor, list[dict[str, Any] | Exception]]:
        t0 = time.perf_counter()
        norm = self.head(hidden)  # [B, C, A]
        _sync(self.device)
        timing["head_ms"] = 1e3 * (time.perf_counter() - t0)
        return norm, [{"used_rfsq": False} for _ in range(hidden.shape[0])]

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

        directory, meta, config = cls._open_saved(directory)
        head = load_module(L1ActionHead(config), directory / "head.safetensors", what="L1 action head weights",
                           hint="Cannot run the L1 baseline without its trained action head.")
        backbone = load_backbone(meta["backbone"], directory, device=device, trust_remote_code=trust_remote_code)
        return cls(backbone, head, NormStats.from_dict(meta["action_stats"]), config=config, device=device,
                   unnorm_key=meta.get("unnorm_key"), action_normalization=meta["action_normalization"])


KINDS: dict[str, type[_LearnedPolicy]] = {cls.kind: cls for cls in (RSDPolicy, L1Policy)}


def saved_speculative(meta: Mapping[str, Any]) -> bool:
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


def read_policy_meta(directory: Path) -> dict[str, Any]:
    meta = _policy_json(directory, hint="Expected a directory written by RSDPolicy/L1Policy.save_pretrained.")
    if meta.get("kind") not in KINDS:
        raise ConfigError(f"{directory}: unknown policy kind {meta.get('kind')!r}; known kinds: {sorted(KINDS)}.")
    return meta

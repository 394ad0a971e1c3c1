"""Train a policy: one backbone, three heads on the same features (RFSQ main, draft, L1).

    hidden [B, D]   = backbone.forward_inputs(inputs)   LowDimBackbone ("lowdim") or PixelBackbone ("pixel")
    main            = RFSQHead.logits_given_prefix(hidden, codes)   -> cross-entropy on all L layers (teacher forced)
    draft           = DraftHead(hidden)                             -> cross-entropy on layers 0..k-1
    l1              = L1ActionHead(hidden)                          -> L1 against the normalized chunk
    loss            = ce_main + ce_draft + l1                       (every head's gradient reaches the backbone)

Determinism and resume: the rows of step ``s`` are drawn by a generator seeded with ``(seed, s)``, a pixel policy's
random crops by one seeded with ``(seed, s, 1)``, and the learning rate is a function of ``s``, so a run stopped at a
checkpoint and resumed gives bit-identical weights to an uninterrupted one (on the same device and thread count). A
checkpoint is ``model.safetensors`` (strict) + ``trainer.pt`` (optimizer state, step, curve;
``torch.load(weights_only=True)``) + ``train_config.json``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsd.backbones import lowdim as _lowdim, pixel as _pixel  # noqa: F401  (register "lowdim", "pixel")
from rsd.backbones.base import build_backbone
from rsd.checkpoint import load_module, read_json, save_module, write_json
from rsd.config import RSDConfig
from rsd.errors import CheckpointNotFoundError, ConfigError
from rsd.heads import DraftHead, L1ActionHead, RFSQHead

__all__ = ["TrainConfig", "PolicyModel", "Trainer", "evaluate_heads", "CHECKPOINT_DIR", "BACKBONES"]

BACKBONES = ("lowdim", "pixel")  # backbones with forward_inputs and a training-data builder (rsd.train)

CHECKPOINT_DIR = "checkpoint"
_MODEL_FILE, _TRAINER_FILE, _CONFIG_FILE = "model.safetensors", "trainer.pt", "train_config.json"
# settings that may change between a checkpoint and its resumption (everything else must match)
_RESUMABLE = ("steps", "eval_every", "checkpoint_every", "device")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 12000
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 500
    seed: int = 0
    eval_every: int = 1000
    checkpoint_every: int = 2000
    device: str = "cpu"
    backbone: dict[str, Any] = field(default_factory=lambda: {"hidden_dim": 256, "width": 96, "layers": 2,
                                                              "heads": 4, "word_buckets": 512,
                                                              "motion": True})
    head_width: int = 128
    draft_layers: int = 3  # k: coarse layers the draft head proposes
    backbone_name: str = "lowdim"  # the registered backbone `backbone` configures: "lowdim" or "pixel"
    amp: bool = False  # bf16 autocast of the training forward pass (CUDA only); evaluation and saved weights: float32

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}.")
        if self.backbone_name not in BACKBONES:
            raise ConfigError(f"--backbone must be one of {BACKBONES}, got {self.backbone_name!r}.")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError(f"need lr > 0, weight_decay >= 0, warmup_steps >= 0; got {self.lr}, "
                              f"{self.weight_decay}, {self.warmup_steps}.")
        if self.amp and not str(self.device).startswith("cuda"):
            raise ConfigError(f"--amp (bf16 autocast) is for CUDA devices; drop it for --device {self.device}.")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 5% of ``lr`` at ``steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


class PolicyModel(nn.Module):
    """The backbone and its three heads, trained together."""

    def __init__(self, rsd_config: RSDConfig, backbone_kwargs: dict[str, Any], backbone_name: str = "lowdim") -> None:
        super().__init__()
        self.rsd_config = rsd_config
        self.backbone = build_backbone(backbone_name, **backbone_kwargs)
        if self.backbone.hidden_dim != rsd_config.hidden_dim:
            raise ConfigError(f"backbone hidden_dim {self.backbone.hidden_dim} != config hidden_dim "
                              f"{rsd_config.hidden_dim}.")
        self.head = RFSQHead(rsd_config)
        self.draft = DraftHead(rsd_config)
        self.l1 = L1ActionHead(rsd_config)

    def losses(self, inputs: Any, actions: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """inputs (LowDimInputs / PixelInputs), normalized chunk [B, C, A], codes [B, L, C, H] -> the three losses and
        their sum."""
        hidden = self.backbone.forward_inputs(inputs)  # [B, D]
        k = self.rsd_config.draft_layers
        main = self.head.logits_given_prefix(hidden, codes)  # [B, L, C, H, G]
        draft = self.draft(hidden)  # [B, k, C, H, G]
        losses = {
            "ce_main": F.cross_entropy(main.flatten(0, -2), codes.flatten()),
            "ce_draft": F.cross_entropy(draft.flatten(0, -2), codes[:, :k].flatten()),
            "l1": (self.l1(hidden) - actions).abs().mean(),
        }
        losses["loss"] = losses["ce_main"] + losses["ce_draft"] + losses["l1"]
        return losses


@torch.inference_mode()
def evaluate_heads(model: PolicyModel, data: Any, rows: np.ndarray, tokenizer: Any, *, batch_size: int = 2048
                   ) -> dict[str, Any]:
    """Held-out metrics on ``rows``: token accuracy per layer (teacher forced and greedy), the draft's accuracy per
    layer and its agreement with greedy (what speculative exact accepts), the L1 head's mean |error| and the greedy
    RSD chunk's, both in normalized units."""
    from rsd.layout import layers_to_codes

    model.eval()
    device = next(model.parameters()).device
    cfg = model.rsd_config
    k = cfg.draft_layers
    tokenizer = tokenizer.to(device)
    sums: dict[str, Any] = {"tf": torch.zeros(cfg.num_layers), "greedy": torch.zeros(cfg.num_layers),
                            "draft": torch.zeros(k), "draft_vs_greedy": torch.zeros(k), "l1": 0.0, "rsd": 0.0,
                            "ce": 0.0}
    n = 0
    for i in range(0, len(rows), batch_size):
        inputs, actions, codes = data.batch(rows[i:i + batch_size])
        inputs, actions, codes = inputs.to(device), actions.to(device), codes.to(device)
        hidden = model.backbone.forward_inputs(inputs)
        tf_logits = model.head.logits_given_prefix(hidden, codes)
        greedy, _ = model.head.rollout(model.head.start(hidden), validate=False)  # [B, L, C, H]
        draft = model.draft(hidden).argmax(-1)  # [B, k, C, H]
        b = codes.shape[0]
        sums["ce"] += float(F.cross_entropy(tf_logits.flatten(0, -2), codes.flatten(), reduction="sum")) / (
            codes[0].numel())
        sums["tf"] += (tf_logits.argmax(-1) == codes).float().mean(dim=(2, 3)).sum(0).cpu()
        sums["greedy"] += (greedy == codes).float().mean(dim=(2, 3)).sum(0).cpu()
        sums["draft"] += (draft == codes[:, :k]).float().mean(dim=(2, 3)).sum(0).cpu()
        sums["draft_vs_greedy"] += (draft == greedy[:, :k]).float().mean(dim=(2, 3)).sum(0).cpu()
        sums["l1"] += float((model.l1(hidden) - actions).abs().mean(dim=(1, 2)).sum())
        decoded = tokenizer.decode_from_indices(layers_to_codes(greedy), validate=False)
        sums["rsd"] += float((decoded - actions).abs().mean(dim=(1, 2)).sum())
        n += b
    model.train()
    per = {key: (v / n).tolist() if isinstance(v, torch.Tensor) else v / n for key, v in sums.items()}
    return {
        "samples": n,
        "token_accuracy_teacher_forced": per["tf"],
        "token_accuracy_greedy": per["greedy"],
        "token_accuracy_greedy_mean": float(np.mean(per["greedy"])),
        "draft_accuracy": per["draft"],
        "draft_agrees_with_greedy": per["draft_vs_greedy"],
        "ce_main": per["ce"],
        "l1_mae": per["l1"],
        "rsd_greedy_mae": per["rsd"],
    }


class Trainer:
    """Runs the loop of the module docstring; owns the checkpoint directory ``out/checkpoint``."""

    def __init__(self, config: TrainConfig, rsd_config: RSDConfig, data: Any, train_rows: np.ndarray,
                 val_rows: np.ndarray, tokenizer: Any, out: Path, *, meta: dict[str, Any]) -> None:
        self.config, self.rsd_config, self.data = config, rsd_config, data
        self.train_rows, self.val_rows, self.tokenizer, self.out = train_rows, val_rows, tokenizer, Path(out)
        self.meta = meta  # what the checkpoint must agree on besides the config (data, split, tokenizer)
        self.device = torch.device(config.device)
        if self.device.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest convolutions once
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(config.seed)
        self.model = PolicyModel(rsd_config, {**config.backbone, "seed": config.seed}, config.backbone_name)
        data.fit_backbone(self.model.backbone, train_rows)
        self.model.to(self.device).train()
        decay, rest = [], []  # weight decay on matrices, not on embeddings, norms and biases
        for name, param in self.model.named_parameters():
            (decay if param.ndim >= 2 and "embedding" not in name and "words" not in name else rest).append(param)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=config.lr)
        self.step = 0
        self.curve: list[dict[str, Any]] = []

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _checkpoint_settings(self) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(self.config).items() if k not in _RESUMABLE}
        if settings["backbone_name"] == "lowdim":  # checkpoints from before --backbone existed resume as they were
            del settings["backbone_name"]
        if not settings["amp"]:  # nor those from before --amp
            del settings["amp"]
        return {"train": settings, "rsd_config": self.rsd_config.to_dict(), **self.meta}

    def save_checkpoint(self) -> Path:
        """Write ``out/checkpoint`` atomically (a new directory renamed over the old one)."""
        final = self.out / CHECKPOINT_DIR
        tmp = self.out / f".{CHECKPOINT_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_module(self.model, tmp / _MODEL_FILE)
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step, "curve": self.curve},
                   tmp / _TRAINER_FILE)
        write_json(tmp / _CONFIG_FILE, {**self._checkpoint_settings(), "step": self.step})
        old = self.out / f".{CHECKPOINT_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> None:
        """Continue from ``out/checkpoint``: ConfigError if it was made with other settings (but the steps, eval and
        checkpoint periods, the device); CheckpointMismatchError (strict load) if its weights do not fit."""
        directory = self.out / CHECKPOINT_DIR
        saved = read_json(directory / _CONFIG_FILE, what="training checkpoint settings",
                          hint="Start without --resume, or point --out at the run to continue.")
        saved.pop("step", None)
        now = self._checkpoint_settings()
        diffs = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now) if saved.get(k) != now.get(k)}
        if diffs:
            raise ConfigError(f"{directory} was trained with other settings (checkpoint, now): {diffs}. Resume with "
                              f"the same settings, or train into a new --out.")
        load_module(self.model, directory / _MODEL_FILE, what="training checkpoint weights")
        self.model.to(self.device).train()
        if not (directory / _TRAINER_FILE).is_file():
            raise CheckpointNotFoundError(f"{directory / _TRAINER_FILE} is missing: the checkpoint is incomplete.")
        state = torch.load(directory / _TRAINER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.curve = int(state["step"]), list(state["curve"])

    # -- the loop --------------------------------------------------------------------------------------------
    def rows_for_step(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, step])
        return self.train_rows[rng.integers(0, len(self.train_rows), self.config.batch_size)]

    def train(self, *, progress: bool = True, on_eval: Callable[[dict[str, Any]], None] | None = None,
              time_limit_s: float | None = None) -> bool:
        """Train up to ``config.steps``; returns False when ``time_limit_s`` stopped it early (after an evaluation
        and a checkpoint at the step reached, so ``--resume`` continues from there)."""
        from tqdm import tqdm

        cfg = self.config
        window: dict[str, torch.Tensor] = {}  # loss sums since the last evaluation, on the device (no sync per step)
        window_steps = 0
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not progress)
        while self.step < cfg.steps:
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr_at(self.step)
            inputs, actions, codes = self.data.batch(self.rows_for_step(self.step),
                                                     augment=np.random.default_rng([cfg.seed, self.step, 1]))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                losses = self.model.losses(inputs.to(self.device), actions.to(self.device), codes.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.step += 1
            for key, value in losses.items():
                window[key] = window.get(key, 0.0) + value.detach()
            window_steps += 1
            bar.update(1)
            out_of_time = time_limit_s is not None and time.perf_counter() - t0 > time_limit_s
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps or out_of_time:
                entry = {"step": self.step, "lr": cfg.lr_at(self.step - 1), "wall_s": time.perf_counter() - t0,
                         "train": {k: float(v) / window_steps for k, v in window.items()}}
                if len(self.val_rows):
                    entry["val"] = evaluate_heads(self.model, self.data, self.val_rows, self.tokenizer)
                self.curve.append(entry)
                window, window_steps = {}, 0
                bar.set_postfix(loss=f"{entry['train']['loss']:.3f}", **(
                    {"val_acc": f"{entry['val']['token_accuracy_greedy_mean']:.3f}"} if "val" in entry else {}))
                if on_eval is not None:
                    on_eval(entry)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or out_of_time:
                self.save_checkpoint()
            if out_of_time:
                break
        bar.close()
        return self.step >= cfg.steps

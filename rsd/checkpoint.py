"""Strict safetensors checkpoints for nn.Modules: every parameter comes from the file, or we raise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rsd.errors import CheckpointMismatchError, CheckpointNotFoundError, CorruptCheckpointError

__all__ = ["save_module", "load_module", "load_safetensors", "read_json", "write_json"]


def load_safetensors(path: str | Path, *, what: str = "weights", device: str = "cpu",
                     hint: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path`` on ``device``: the one place rsd reads safetensors.

    CheckpointNotFoundError when it does not exist; CorruptCheckpointError naming the file when it is empty,
    truncated or not safetensors at all (safetensors' own error names neither the file nor the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} not found: {path} does not exist. {hint}".strip())
    try:
        return load_file(str(path), device=device)
    except SafetensorError as exc:
        raise CorruptCheckpointError(
            f"{what} at {path} ({path.stat().st_size} bytes) is not a readable safetensors file ({exc}): it is "
            f"empty, truncated or corrupt. Save or download it again. {hint}".strip()) from exc


def save_module(module: torch.nn.Module, path: str | Path) -> None:
    """Write ``module.state_dict()`` (persistent entries only) to ``path`` as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def load_module(module: torch.nn.Module, path: str | Path, *, what: str = "weights", hint: str = "") -> torch.nn.Module:
    """Load ``path`` into ``module`` strictly (no missing, unexpected or reshaped entry) and return it in eval mode."""
    path = Path(path)
    state = load_safetensors(path, what=what, hint=hint)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(
            f"{what} at {path} do not match the model built from its config: "
            f"missing={missing[:8]}{'...' if len(missing) > 8 else ''} "
            f"unexpected={unexpected[:8]}{'...' if len(unexpected) > 8 else ''} shape mismatches={reshaped[:8]}. "
            f"Was the checkpoint saved with a different config?"
        )
    module.load_state_dict(state, strict=True)
    return module.eval()


def read_json(path: str | Path, *, what: str, hint: str = "") -> dict[str, Any]:
    """A JSON object from ``path``: CheckpointNotFoundError when it is missing, CheckpointMismatchError naming the
    file when it is not UTF-8 JSON or holds something other than an object."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} not found: {path} does not exist. {hint}".strip())
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointMismatchError(f"{what} {path} is not valid JSON ({exc}). {hint}".strip()) from exc
    if not isinstance(data, dict):
        raise CheckpointMismatchError(f"{what} {path} holds a JSON {type(data).__name__}, expected an object "
                                      f"({{...}}). {hint}".strip())
    return data


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

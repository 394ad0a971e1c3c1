"""Strict safetensors checkpoints for nn.Modules: every parameter comes from the file, or we raise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rsd.errors import CheckpointMismatchError, CheckpointNotFoundError

__all__ = ["save_module", "load_module", "read_json", "write_json"]


def save_module(module: torch.nn.Module, path: str | Path) -> None:
    """Write ``module.state_dict()`` (persistent entries only) to ``path`` as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def load_module(module: torch.nn.Module, path: str | Path, *, what: str = "weights", hint: str = "") -> torch.nn.Module:
    """Load ``path`` into ``module`` strictly (no missing, unexpected or reshaped entry) and return it in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} not found: {path} does not exist. {hint}".strip())
    state = load_file(str(path))
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
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} not found: {path} does not exist. {hint}".strip())
    return json.loads(path.read_text())


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

"""Shared pytest set-up: markers by folder, device selection, skip helpers with reasons that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

# Marker implied by the folder a test lives in (a test may add more, e.g. `benchmark` or `gpu`).
_FOLDER_MARKERS = {"unit": "unit", "integration": "integration", "sim": "sim", "gpu": "gpu", "faults": "unit",
                   "contracts": "unit"}
# a test in tests/faults or tests/contracts marked with one of these (explicitly) is not also `unit`: it runs
# LIBERO or needs CUDA
_MIXED_FOLDERS = ("faults", "contracts")
_SLOW_MARKERS = ("sim", "gpu", "integration")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if len(parts) >= 2 and parts[0] == "tests" and parts[1] in _FOLDER_MARKERS:
            slow = parts[1] in _MIXED_FOLDERS and any(item.get_closest_marker(m) for m in _SLOW_MARKERS)
            if not slow:
                item.add_marker(getattr(pytest.mark, _FOLDER_MARKERS[parts[1]]))
        if item.get_closest_marker("gpu") is not None and not _cuda_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA: no CUDA device visible to torch (run on a GPU machine: pytest -m gpu)"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# tests/ holds shared helpers (policy_factory, the tiny HF model builder) importable from every test folder
import sys as _sys

_sys.path.insert(0, str(ROOT / "tests"))

"""The learned policies shipped inside the package, by name: what ``rsd eval`` runs when no ``--policy`` is given.

``lowdim`` is the low-dimensional RSD policy (``rsd train-policy``: object poses + proprio + instruction ->
RFSQ tokens, greedy by default, a draft head for ``--decode exact|relaxed``), trained on libero_spatial and
libero_object demonstrations; ``lowdim-l1`` is its L1-regression sibling (the same backbone weights).
``docs/learned-policies.md`` says how they were trained and what they reach.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PACKAGED_POLICIES", "DEFAULT_POLICY", "resolve_packaged"]

_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "policies"
PACKAGED_POLICIES: dict[str, Path] = {"lowdim": _ASSETS / "lowdim_rsd", "lowdim-l1": _ASSETS / "lowdim_l1"}
DEFAULT_POLICY = "lowdim"


def resolve_packaged(spec: str) -> str:
    """A packaged policy's name -> its directory (as a string); any other spec unchanged."""
    return str(PACKAGED_POLICIES[spec]) if spec in PACKAGED_POLICIES else spec

"""Policies: observation + instruction -> an env-ready action chunk.

Every policy (RSD, the L1 baseline, OpenVLA-OFT's own L1 pipeline, the scripted experts, the tokenizer
round trip) implements one protocol, :class:`Policy`, and returns an :class:`ActionChunk`.

- ``rsd.policy.protocol``     ``Policy``, ``ActionChunk`` (numpy only: what the simulator imports)
- ``rsd.policy.postprocess``  ``ActionPostprocessor``: normalized actions -> env-ready (the one place)
- ``rsd.policy.learned``      ``RSDPolicy``, ``L1Policy`` (backbone -> hidden -> heads -> tokenizer)
- ``rsd.policy.oft``          ``OFTL1Policy``: OpenVLA-OFT's own L1 pipeline
- ``rsd.policy.roundtrip``    ``RFSQRoundTripPolicy``: any policy's chunks through the tokenizer and back
- ``rsd.policy.identity``     ``policy_identity``: what stands behind a ``--policy`` spec (content hash)
- ``rsd.policy.factory``      ``make_policy`` (``--policy`` strings), ``load_policy`` (saved dirs), the ``--fast`` plan

Names are loaded on first use, so ``from rsd.policy import ActionChunk`` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ActionChunk": "protocol", "Policy": "protocol",
    "ActionPostprocessor": "postprocess",
    "RSDPolicy": "learned", "L1Policy": "learned",
    "OFTL1Policy": "oft",
    "RFSQRoundTripPolicy": "roundtrip",
    "policy_identity": "identity",
    "make_policy": "factory", "load_policy": "factory", "fast_plan": "factory", "FastPlan": "factory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rsd.policy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rsd.policy.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

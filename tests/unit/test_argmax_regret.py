"""rsd.fastpath.argmax_regret: the tie-aware criterion that the compiled graphed decoder is checked with."""

from __future__ import annotations

import pytest
import torch

from rsd.config import RSDConfig
from rsd.fastpath import argmax_regret
from rsd.heads import RFSQHead
from rsd.speculative import greedy_decode

pytestmark = pytest.mark.unit


def _head(seed: int = 0) -> tuple[RSDConfig, RFSQHead]:
    cfg = RSDConfig.tiny()
    torch.manual_seed(seed)
    return cfg, RFSQHead(cfg).eval()


def test_greedy_codes_have_zero_regret_and_a_flipped_code_does_not() -> None:
    cfg, head = _head()
    hidden = torch.randn(3, cfg.hidden_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        codes = greedy_decode(head, hidden)
        assert argmax_regret(head, hidden, codes).tolist() == [0.0, 0.0, 0.0]
        for layer in (0, cfg.num_layers - 1):  # the first layer and the last (no later layer depends on it)
            wrong = codes.clone()
            wrong[2, 1, 0, layer] = (wrong[2, 1, 0, layer] + 1) % cfg.num_levels
            regret = argmax_regret(head, hidden, wrong)
            assert regret[:2].tolist() == [0.0, 0.0] and float(regret[2]) > 0.0


def test_regret_is_the_logit_gap_at_the_flipped_token() -> None:
    cfg, head = _head(seed=1)
    hidden = torch.randn(1, cfg.hidden_dim, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        codes = greedy_decode(head, hidden)
        last = cfg.num_layers - 1
        logits = head(hidden)[0, last, 0, 0]  # [G], greedy prefix = the same prefix as `codes`
        other = int(torch.argsort(logits, descending=True)[1])
        wrong = codes.clone()
        wrong[0, 0, 0, last] = other
        gap = float(logits.max() - logits[other])
        assert float(argmax_regret(head, hidden, wrong)[0]) == pytest.approx(gap, rel=1e-6)

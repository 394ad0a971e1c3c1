"""The graph-free parts of rsd.fastpath on the CPU: greedy_decode_packed and its host-side inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsd.config import RSDConfig
from rsd.errors import ShapeError
from rsd.fastpath import greedy_decode_packed, unpack_decoded
from rsd.heads import RFSQHead
from rsd.speculative import greedy_decode
from rsd.tokenizer import RFSQTokenizer

pytestmark = pytest.mark.unit


def test_packed_decode_unpacks_to_greedy_codes_actions_and_flags() -> None:
    cfg = RSDConfig.tiny()
    torch.manual_seed(0)
    head, tok = RFSQHead(cfg).eval(), RFSQTokenizer.from_config(cfg).eval()
    hidden = torch.randn(3, cfg.hidden_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        codes, actions, flags, packed = greedy_decode_packed(head, tok, hidden)
        expected = greedy_decode(head, hidden)
        assert torch.equal(codes, expected)
        assert torch.equal(actions, tok.decode_from_indices(expected))
        assert flags.tolist() == [True, True, True]
        got_codes, got_actions, got_flags = unpack_decoded(packed.numpy(), 3, cfg)
    assert got_codes.dtype == np.int64 and np.array_equal(got_codes, expected.numpy())
    assert np.array_equal(got_actions, actions.numpy()) and got_flags.tolist() == [1.0, 1.0, 1.0]
    assert len({row.tobytes() for row in got_actions}) == 3  # rows stay apart: the layout is per sample


def test_unpack_refuses_a_vector_of_the_wrong_size() -> None:
    cfg = RSDConfig.tiny()
    n = cfg.chunk_len * cfg.latent_dim * cfg.num_layers + cfg.chunk_len * cfg.action_dim + 3
    unpack_decoded(np.zeros(n, np.float32), 1, cfg)
    with pytest.raises(ShapeError, match="packed decode output"):
        unpack_decoded(np.zeros(n, np.float32), 2, cfg)
    with pytest.raises(ShapeError, match="packed decode output"):
        unpack_decoded(np.zeros(n - 1, np.float32), 1, cfg)

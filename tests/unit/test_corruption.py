"""``rsd.corruption``: exact counts, confined to the requested layers, every corrupted token different, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsd.config import RSDConfig
from rsd.corruption import corrupt_codes, corrupted_count, mode_layers, parse_layers
from rsd.errors import CodeRangeError, ConfigError, DTypeError, ShapeError
from rsd.tokenizer import RFSQTokenizer

pytestmark = pytest.mark.unit

CFG = RSDConfig.tiny()


@pytest.fixture(scope="module")
def codes() -> torch.Tensor:
    torch.manual_seed(0)
    tok = RFSQTokenizer.from_config(CFG).eval()
    with torch.inference_mode():
        return tok.encode(torch.rand(6, CFG.chunk_len, CFG.action_dim) * 2 - 1)  # [B, C, H, L]


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("layers", [[0], [0, 1], [2, 3], list(range(CFG.num_layers))])
def test_exact_count_confined_to_layers_and_all_different(codes, fraction, layers) -> None:
    out, mask = corrupt_codes(codes, fraction, layers, np.random.default_rng(1), levels=CFG.num_levels)
    eligible = codes.shape[0] * codes.shape[1] * codes.shape[2] * len(layers)
    assert int(mask.sum()) == corrupted_count(fraction, eligible) == int(np.floor(fraction * eligible + 0.5))
    others = [x for x in range(CFG.num_layers) if x not in layers]
    assert not mask[..., others].any()  # nothing outside the requested layers
    assert torch.equal(out[~mask], codes[~mask])  # untouched tokens unchanged
    assert (out[mask] != codes[mask]).all()  # every corrupted token differs
    assert out.dtype == torch.int64 and out.shape == codes.shape
    assert int(out.min()) >= 0 and int(out.max()) < CFG.num_levels


def test_fraction_zero_is_the_identity_and_draws_nothing(codes) -> None:
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state
    out, mask = corrupt_codes(codes, 0.0, [0, 1], rng, levels=CFG.num_levels)
    assert torch.equal(out, codes) and not mask.any() and out is not codes
    assert rng.bit_generator.state == before


def test_seeded_reproducible_and_input_untouched(codes) -> None:
    copy = codes.clone()
    a = corrupt_codes(codes, 0.3, [1, 2], np.random.default_rng(42), levels=CFG.num_levels)
    b = corrupt_codes(codes, 0.3, [1, 2], np.random.default_rng(42), levels=CFG.num_levels)
    c = corrupt_codes(codes, 0.3, [1, 2], np.random.default_rng(43), levels=CFG.num_levels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(codes, copy)


def test_replacement_levels_are_uniform_over_the_others() -> None:
    codes = torch.zeros(1, 50, 40, 2, dtype=torch.int64)  # 4000 tokens all at level 0
    out, mask = corrupt_codes(codes, 1.0, [0, 1], np.random.default_rng(0), levels=5)
    counts = np.bincount(out[mask].numpy(), minlength=5)
    assert counts[0] == 0 and abs(counts[1:] / counts.sum() - 0.25).max() < 0.03


def test_typed_errors(codes) -> None:
    rng = np.random.default_rng(0)
    for bad in (-0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ConfigError):
            corrupt_codes(codes, bad, [0], rng, levels=CFG.num_levels)
    for bad in ([], [CFG.num_layers], [-1], [0, 0], [0.5]):
        with pytest.raises(ConfigError):
            corrupt_codes(codes, 0.1, bad, rng, levels=CFG.num_levels)
    with pytest.raises(DTypeError):
        corrupt_codes(codes.float(), 0.1, [0], rng, levels=CFG.num_levels)
    with pytest.raises(DTypeError):
        corrupt_codes(codes.numpy(), 0.1, [0], rng, levels=CFG.num_levels)
    with pytest.raises(ShapeError):
        corrupt_codes(codes[0], 0.1, [0], rng, levels=CFG.num_levels)
    with pytest.raises(CodeRangeError):
        corrupt_codes(codes + CFG.num_levels, 0.1, [0], rng, levels=CFG.num_levels)
    with pytest.raises(ConfigError):
        corrupt_codes(codes, 0.1, [0], 7, levels=CFG.num_levels)


def test_modes_and_layer_specs() -> None:
    assert parse_layers("0-1", 8) == [0, 1] and parse_layers("0,2, 5", 8) == [0, 2, 5] and parse_layers("3", 8) == [3]
    assert mode_layers("uniform", [0, 1], 8) == list(range(8))
    assert mode_layers("coarse", [0, 1], 8) == [0, 1]
    assert mode_layers("fine", [0, 1], 8) == list(range(2, 8))
    for spec in ("a", "3-1", "0-8", ""):
        with pytest.raises(ConfigError):
            parse_layers(spec, 8)
    with pytest.raises(ConfigError):
        mode_layers("fine", list(range(8)), 8)
    with pytest.raises(ConfigError):
        mode_layers("medium", [0], 8)

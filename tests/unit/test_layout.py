"""Token layouts: round trips, the c-major flat index, and the silent wrong permutations of docs/failure-modes.md."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rsd import layout
from rsd.errors import DTypeError, NonFiniteError, ShapeError

pytestmark = pytest.mark.unit

sizes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(2, 7))


def random_codes(b, c, h, l, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, g, (b, c, h, l), generator=gen)


def one_hot_logits(codes, g):
    """codes [B,C,H,L] -> logits [B,L,C,H,G] whose argmax is exactly those codes."""
    layers = codes.permute(0, 3, 1, 2)  # [B, L, C, H], written by hand on purpose (independent of rsd.layout)
    return torch.nn.functional.one_hot(layers, g).float()


@settings(max_examples=20, deadline=None)
@given(sizes, st.integers(0, 2**31 - 1))
def test_one_hot_logits_round_trip(dims, seed):
    b, c, h, l, g = dims
    codes = random_codes(b, c, h, l, g, seed)
    out = layout.logits_to_codes(one_hot_logits(codes, g))
    assert out.dtype == torch.int64
    assert out.shape == (b, c, h, l)
    assert torch.equal(out, codes)


@settings(max_examples=20, deadline=None)
@given(sizes, st.integers(0, 2**31 - 1))
def test_layers_codes_inverse(dims, seed):
    b, c, h, l, g = dims
    codes = random_codes(b, c, h, l, g, seed)
    layers = layout.codes_to_layers(codes)
    assert layers.shape == (b, l, c, h)
    assert torch.equal(layout.layers_to_codes(layers), codes)


@settings(max_examples=20, deadline=None)
@given(sizes)
def test_flat_canonical_inverse(dims):
    b, c, h, l, g = dims
    logits = torch.randn(b, l, c, h, g)
    flat = layout.canonical_to_flat(logits)
    assert flat.shape == (b, l, c * h, g)
    assert torch.equal(layout.flat_to_canonical(flat, c, h), logits)


def test_flat_index_is_c_major():
    """Pin flat index c*H + h with a hand-built tensor: flat[.., c*H + h, ..] lands at [.., c, h, ..]."""
    C, H, L, G = 8, 16, 8, 7
    flat = torch.zeros(1, L, C * H, G)
    flat[0, 2, 5 * H + 11, 4] = 1.0  # layer 2, step 5, latent dim 11, level 4
    canon = layout.flat_to_canonical(flat, C, H)
    assert canon[0, 2, 5, 11, 4] == 1.0 and canon.sum() == 1.0
    codes = layout.logits_to_codes(canon + 0.0)
    assert codes[0, 5, 11, 2] == 4


def test_the_seed_flat_decode_matches():
    """The original research path argmax -> [B,L,128] -> permute(0,2,1) -> view [B,C,H,L] is what rsd computes."""
    C, H, L, G = 8, 16, 8, 7
    codes = random_codes(2, C, H, L, G, seed=3)
    flat = layout.canonical_to_flat(one_hot_logits(codes, G))
    seed_codes = flat.argmax(-1).permute(0, 2, 1).reshape(2, C, H, L)
    assert torch.equal(seed_codes, codes)
    assert torch.equal(layout.logits_to_codes(layout.flat_to_canonical(flat, C, H)), codes)


def test_wrong_permutations_give_different_codes():
    """The silent variants (docs/failure-modes.md) raise no error but scramble the codes; the round trip catches them."""
    C, H, L, G = 8, 16, 8, 7
    codes = random_codes(1, C, H, L, G, seed=1)
    flat = layout.canonical_to_flat(one_hot_logits(codes, G))  # [1, L, 128, G]
    idx = flat.argmax(-1)  # [1, L, 128]
    wrong = {
        "view without permute": idx.reshape(1, C, H, L),
        # [B, L, C, H] -> permute(0, 3, 2, 1) = [B, H, C, L], then forced into [B, C, H, L]
        "permute(0, 3, 2, 1)": one_hot_logits(codes, G).argmax(-1).permute(0, 3, 2, 1).reshape(1, C, H, L),
        "128 as h*8 + c": idx.permute(0, 2, 1).reshape(1, H, C, L).permute(0, 2, 1, 3),
    }
    right = layout.logits_to_codes(layout.flat_to_canonical(flat, C, H))
    assert torch.equal(right, codes)
    for name, scrambled in wrong.items():
        assert scrambled.shape == codes.shape, name  # no shape error: that is what makes them dangerous
        assert not torch.equal(scrambled, codes), f"the wrong variant {name!r} was not detected"


def test_errors():
    with pytest.raises(ShapeError, match=r"\[B, L, C, H, G\]"):
        layout.logits_to_codes(torch.zeros(2, 3, 4, 5))
    with pytest.raises(DTypeError, match="int64"):
        layout.layers_to_codes(torch.zeros(1, 2, 3, 4))
    with pytest.raises(NonFiniteError):
        layout.logits_to_codes(torch.full((1, 1, 1, 1, 3), float("nan")))
    with pytest.raises(ShapeError, match="chunk_len\\*latent_dim"):
        layout.flat_to_canonical(torch.zeros(1, 8, 100, 7), 8, 16)
    with pytest.raises(DTypeError):
        layout.logits_to_codes([[1, 2]])

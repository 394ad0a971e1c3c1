"""RFSQTokenizer: shapes, the exact encode/decode round trip, the residual structure, errors, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file, save_file

from rsd.config import RSDConfig
from rsd.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CodeRangeError,
    ConfigError,
    DTypeError,
    NonFiniteError,
    ShapeError,
)
from rsd.tokenizer import RFSQTokenizer

pytestmark = pytest.mark.unit

CFG = RSDConfig.tiny()  # C=4 A=7 H=4 L=4 G=5 width=16
B_MAX = 5
FAST = settings(max_examples=25, deadline=None)


def make(seed: int = 0, cfg: RSDConfig = CFG) -> RFSQTokenizer:
    torch.manual_seed(seed)
    return RFSQTokenizer.from_config(cfg)


def random_actions(batch: int, seed: int, scale: float = 1.0, cfg: RSDConfig = CFG) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.chunk_len, cfg.action_dim, generator=g) * scale


def random_codes(batch: int, seed: int, layers: int | None = None, cfg: RSDConfig = CFG) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.chunk_len, cfg.latent_dim, cfg.num_layers if layers is None else layers)
    return torch.randint(0, cfg.num_levels, shape, generator=g)


def finite_actions(cfg: RSDConfig = CFG, bound: float = 1e3) -> st.SearchStrategy[np.ndarray]:
    elements = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
    shapes = st.tuples(st.integers(1, B_MAX), st.just(cfg.chunk_len), st.just(cfg.action_dim))
    return hnp.arrays(np.float32, shapes, elements=elements)


# construction, buffers, config


def test_config_round_trip_and_from_config() -> None:
    tok = make()
    assert tok.config == dict(chunk_len=4, action_dim=7, latent_dim=4, num_layers=4, num_levels=5, width=16)
    assert RFSQTokenizer(**tok.config).config == tok.config
    assert RFSQTokenizer().config == RFSQTokenizer.from_config(RSDConfig()).config


def test_scales_are_fixed_non_persistent_buffers() -> None:
    tok = make()
    G, L = CFG.num_levels, CFG.num_layers
    expected = torch.tensor([(G - 1) ** -q for q in range(L)], dtype=torch.float32)
    assert torch.equal(tok.scales, expected)
    assert set(tok.state_dict()) == {f"{part}.{i}.{p}" for part in ("encoder", "decoder")
                                     for i in (0, 2) for p in ("weight", "bias")}
    # layer 0's grid is linspace(-1, 1, G) with an exact 0 in the middle
    assert torch.allclose(tok.codebook[0], torch.linspace(-1, 1, G), atol=1e-7)
    assert tok.codebook[0][G // 2] == 0


@pytest.mark.parametrize("kwargs", [dict(num_levels=6), dict(num_levels=1), dict(latent_dim=0), dict(width=2.5)])
def test_bad_constructor_args_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        RFSQTokenizer(**kwargs)


# shapes


@FAST
@given(batch=st.integers(1, B_MAX), seed=st.integers(0, 2**16))
def test_shapes_dtype_and_range(batch: int, seed: int) -> None:
    tok = make(seed % 7)
    x = random_actions(batch, seed)
    codes = tok.encode(x)
    assert codes.shape == (batch, CFG.chunk_len, CFG.latent_dim, CFG.num_layers)
    assert codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < CFG.num_levels
    recon, codes2 = tok(x)
    assert recon.shape == x.shape and recon.dtype == torch.float32
    assert torch.equal(codes, codes2)
    assert tok.decode_from_indices(codes).shape == x.shape
    quantized, codes3 = tok.quantize(tok.encoder(x))
    assert quantized.shape == (batch, CFG.chunk_len, CFG.latent_dim) and torch.equal(codes, codes3)


# the exact round trip


@settings(max_examples=30, deadline=None)
@given(x=finite_actions(), seed=st.integers(0, 2**16), train=st.booleans())
def test_decode_of_encode_equals_forward_exactly(x: np.ndarray, seed: int, train: bool) -> None:
    tok = make(seed).train(train)
    actions = torch.from_numpy(x)
    recon, codes = tok(actions)
    assert torch.equal(tok.decode_from_indices(tok.encode(actions)), recon)
    assert torch.equal(tok.encode(actions), codes)
    assert torch.equal(tok.quantize(tok.encoder(actions))[0], tok.codes_to_latent(codes))


@FAST
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e3, 1e6, 1e20]),
       train=st.booleans())
def test_exact_round_trip_over_scales(seed: int, scale: float, train: bool) -> None:
    tok = make(seed).train(train)
    actions = random_actions(3, seed, scale)
    recon, _ = tok(actions)
    assert torch.isfinite(recon).all()
    assert torch.equal(tok.decode_from_indices(tok.encode(actions)), recon)


def test_exact_round_trip_default_sizes() -> None:
    torch.manual_seed(0)
    tok = RFSQTokenizer()  # C=8 A=7 H=16 L=8 G=7 width=64
    actions = torch.rand(2, 8, 7) * 2 - 1
    for train in (True, False):
        recon, codes = tok.train(train)(actions)
        assert codes.shape == (2, 8, 16, 8)
        assert torch.equal(tok.decode_from_indices(tok.encode(actions)), recon)
    # every residual layer is alive (an unscaled variant leaves layers 1-7 at the middle level: docs/failure-modes.md)
    used = [int(codes[..., q].unique().numel()) for q in range(8)]
    assert min(used) >= 2, used


def test_straight_through_gradient_is_identity_and_reaches_encoder() -> None:
    tok = make(1).train()
    latent = (torch.rand(2, CFG.chunk_len, CFG.latent_dim) * 2 - 1).requires_grad_()
    weight = torch.randn(2, CFG.chunk_len, CFG.latent_dim)
    quantized, _ = tok.quantize(latent)
    (quantized * weight).sum().backward()
    assert torch.equal(latent.grad, weight)

    actions = random_actions(4, 0)
    recon, _ = tok(actions)
    torch.nn.functional.mse_loss(recon, actions).backward()
    for name, param in tok.encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"no gradient reached encoder.{name}"


# residual structure


def _tie_points(cfg: RSDConfig = CFG) -> list[float]:
    """Latents exactly on (or next to) a decision boundary of some layer: (2m+1)/2 steps of layer q."""
    G, L = cfg.num_levels, cfg.num_layers
    points = []
    for q in range(L):
        step = 2.0 / (G - 1) * (G - 1) ** -q
        for m in range(-(G - 1) // 2, (G - 1) // 2):
            v = np.float32((m + 0.5) * step)
            points += [float(v), float(np.nextafter(v, np.float32(2))), float(np.nextafter(v, np.float32(-2)))]
    return points + [-1.0, 1.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(latent=hnp.arrays(np.float32, (3, CFG.chunk_len, CFG.latent_dim),
                         elements=st.one_of(st.floats(-1, 1, width=32), st.sampled_from(_tie_points()))))
def test_latent_error_is_non_increasing_in_layers_exactly(latent: np.ndarray) -> None:
    # Why this holds exactly, per element, in float32: RFSQTokenizer._quantize_indices builds the
    # running sum of layer values with the same arithmetic and order as codes_to_latent(codes, k), so
    # err[k] below is exactly the error the encoder saw before layer k. Layer k either adds the zero
    # level (total + 0.0 == total, error unchanged bit for bit) or adds a level for which it checked
    # |latent - (total + value)| <= |latent - total| in that same arithmetic. Hence err[k+1] <= err[k].
    # In exact arithmetic the check always passes: the rounded level is the nearest level to the
    # scaled residual and 0 is one of the levels (G odd); clamping only picks the outer level when the
    # residual lies beyond it, where it is still nearer than 0.
    tok = make()
    z = torch.from_numpy(latent)
    _, codes = tok.quantize(z)
    errs = [z.abs()] + [(z - tok.codes_to_latent(codes, k)).abs() for k in range(1, CFG.num_layers + 1)]
    for k in range(CFG.num_layers):
        assert torch.all(errs[k + 1] <= errs[k]), f"error grew at layer {k}"
        # and each layer's grid covers what the previous one left: error <= half a step of layer k
        half_step = (CFG.num_levels - 1) ** -(k + 1)
        assert float(errs[k + 1].max()) <= half_step + 1e-6


def test_decoding_is_per_step_not_tiled() -> None:
    tok = make(3).eval()
    codes = random_codes(1, 5)
    codes[0, :, 0, 0] = torch.arange(CFG.chunk_len) % CFG.num_levels  # rows differ in layer 0
    actions = tok.decode_from_indices(codes)[0]  # [C, A]
    for i in range(CFG.chunk_len):
        for j in range(i + 1, CFG.chunk_len):
            assert not torch.equal(actions[i], actions[j]), f"rows {i} and {j} decoded identically"
    # changing the codes of step 2 only changes row 2
    changed = codes.clone()
    changed[0, 2] = (changed[0, 2] + 1) % CFG.num_levels
    after = tok.decode_from_indices(changed)[0]
    rows = [c for c in range(CFG.chunk_len) if not torch.equal(after[c], actions[c])]
    assert rows == [2]


def test_coarse_decoding_uses_only_the_first_layers() -> None:
    tok = make(4).eval()
    codes = random_codes(2, 6)
    for k in range(1, CFG.num_layers + 1):
        prefix = codes[..., :k]
        full = tok.decode_from_indices(codes, num_layers=k)
        assert torch.equal(tok.decode_from_indices(prefix, num_layers=k), full)
        other = codes.clone()
        other[..., k:] = (other[..., k:] + 1) % CFG.num_levels  # later layers must not matter
        assert torch.equal(tok.decode_from_indices(other, num_layers=k), full)
    assert torch.equal(tok.decode_from_indices(codes, num_layers=CFG.num_layers), tok.decode_from_indices(codes))


def test_unchecked_decoding_is_the_checked_arithmetic() -> None:
    """validate=False (for codes valid by construction) decodes bit for bit what validate=True decodes."""
    tok = make(5).eval()
    codes = random_codes(3, 7)
    with torch.no_grad():
        assert torch.equal(tok.decode_from_indices(codes, validate=False), tok.decode_from_indices(codes))
        for k in range(1, CFG.num_layers + 1):
            assert torch.equal(tok.decode_from_indices(codes[..., :k], num_layers=k, validate=False),
                               tok.decode_from_indices(codes, num_layers=k))


# errors


@pytest.mark.parametrize(
    "bad, error, pattern",
    [
        (np.zeros((1, 4, 7), np.float32), ShapeError, r"torch.Tensor \[B, C, A\].*ndarray"),
        (torch.zeros(4, 7), ShapeError, r"\[B, C, A\] \(3 dims\), got shape \(4, 7\)"),
        (torch.zeros(1, 5, 7), ShapeError, r"C=4.*\(1, 5, 7\)"),
        (torch.zeros(1, 4, 6), ShapeError, r"A=7.*\(1, 4, 6\)"),
        (torch.zeros(1, 4, 7, dtype=torch.float64), DTypeError, r"float32.*float64.*\.to\(torch.float32\)"),
        (torch.full((1, 4, 7), float("nan")), NonFiniteError, r"28 NaN/inf entries of 28"),
        (torch.tensor([float("inf")] + [0.0] * 27).reshape(1, 4, 7), NonFiniteError, r"1 NaN/inf"),
    ],
)
def test_bad_actions_raise(bad: object, error: type, pattern: str) -> None:
    tok = make()
    with pytest.raises(error, match=pattern):
        tok.encode(bad)
    with pytest.raises(error, match=pattern):
        tok(bad)


@pytest.mark.parametrize(
    "bad, kwargs, error, pattern",
    [
        ([[0]], {}, ShapeError, r"torch.Tensor \[B, C, H, L\].*list"),
        (torch.zeros(4, 4, 4, dtype=torch.int64), {}, ShapeError, r"4 dims\), got shape \(4, 4, 4\)"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.int64), {}, ShapeError, r"C=4.*\(1, 3, 4, 4\)"),
        (torch.zeros(1, 4, 5, 4, dtype=torch.int64), {}, ShapeError, r"H=4.*\(1, 4, 5, 4\)"),
        (torch.zeros(1, 4, 4, 3, dtype=torch.int64), {}, ShapeError, r"L=4.*num_layers=k"),
        (torch.zeros(1, 4, 4, 5, dtype=torch.int64), {"num_layers": 2}, ShapeError, r"5 layers.*L=4"),
        (torch.zeros(1, 4, 4, 2, dtype=torch.int64), {"num_layers": 3}, ShapeError, r"at least 3 layers.*got 2"),
        (torch.zeros(1, 4, 4, 4, dtype=torch.int64), {"num_layers": 0}, ConfigError, r"\[1, 4\].*got 0"),
        (torch.zeros(1, 4, 4, 4, dtype=torch.int64), {"num_layers": 5}, ConfigError, r"\[1, 4\].*got 5"),
        (torch.zeros(1, 4, 4, 4, dtype=torch.int32), {}, DTypeError, r"int64.*torch.int32"),
        (torch.zeros(1, 4, 4, 4), {}, DTypeError, r"int64.*torch.float32"),
        (torch.full((1, 4, 4, 4), 5), {}, CodeRangeError, r"\[0, 5\).*G=5.*min 5 and max 5.*64 entries"),
        (torch.full((1, 4, 4, 4), -1), {}, CodeRangeError, r"min -1 and max -1"),
    ],
)
def test_bad_codes_raise(bad: object, kwargs: dict, error: type, pattern: str) -> None:
    tok = make()
    with pytest.raises(error, match=pattern):
        tok.decode_from_indices(bad, **kwargs)
    with pytest.raises(error, match=pattern):
        tok.codes_to_latent(bad, **kwargs)


def test_code_range_error_reports_min_and_max_found() -> None:
    codes = random_codes(2, 0)
    codes[0, 0, 0, 0], codes[1, 1, 1, 1] = -3, 9
    with pytest.raises(CodeRangeError, match=r"min -3 and max 9 \(2 entries outside\)"):
        make().decode_from_indices(codes)


def test_bad_latent_raises() -> None:
    tok = make()
    with pytest.raises(ShapeError, match="H=4"):
        tok.quantize(torch.zeros(1, 4, 3))
    with pytest.raises(NonFiniteError, match="latent"):
        tok.quantize(torch.full((1, 4, 4), float("nan")))


# checkpoints


def test_save_load_round_trip(tmp_path) -> None:
    tok = make(8).train()
    tok.save_pretrained(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["format_version"] == 1 and meta["config"] == tok.config
    loaded = RFSQTokenizer.from_pretrained(tmp_path / "tok", config=CFG)
    assert not loaded.training
    for key, value in tok.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    actions, codes = random_actions(3, 1), random_codes(3, 2)
    assert torch.equal(loaded(actions)[0], tok.eval()(actions)[0])
    assert torch.equal(loaded.encode(actions), tok.encode(actions))
    assert torch.equal(loaded.decode_from_indices(codes), tok.decode_from_indices(codes))


def test_load_into_different_config_raises(tmp_path) -> None:
    make().save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"latent_dim: checkpoint 4 vs config 5"):
        RFSQTokenizer.from_pretrained(tmp_path, config=RSDConfig.tiny(latent_dim=5))


def test_weights_that_do_not_match_the_json_config_raise(tmp_path) -> None:
    make().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    meta["config"]["width"] = 32  # the weights were saved with width 16
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match=r"shape differences.*encoder\.0\.weight: checkpoint \(16, 7\) vs model \(32, 7\)"):
        RFSQTokenizer.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_raise(tmp_path) -> None:
    make().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "tokenizer.safetensors"))
    state.pop("decoder.2.bias")
    state["decoder.3.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "tokenizer.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['decoder.2.bias'\].*unexpected keys \['decoder.3.weight'\]"):
        RFSQTokenizer.from_pretrained(tmp_path)


def test_missing_files_raise_not_found(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"does not exist.*rsd train-tokenizer") as info:
        RFSQTokenizer.from_pretrained(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError)
    make().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.safetensors.*missing.*rsd train-tokenizer"):
        RFSQTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"tokenizer.json"):
        RFSQTokenizer.from_pretrained(tmp_path)


def test_corrupt_or_foreign_json_raises_mismatch(tmp_path) -> None:
    make().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointMismatchError, match="not valid JSON"):
        RFSQTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "rsd.RFSQTokenizer", "format_version": 99}))
    with pytest.raises(CheckpointMismatchError, match=r"v1 file \(found \('rsd.RFSQTokenizer', 99\)\)"):
        RFSQTokenizer.from_pretrained(tmp_path)

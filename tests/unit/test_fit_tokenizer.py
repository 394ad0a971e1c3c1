"""fit_tokenizer and smooth_trajectories: a short fit on smooth synthetic chunks, the report, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rsd.config import RSDConfig
from rsd.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from rsd.tokenizer import RFSQTokenizer
from rsd.train import TokenizerFitReport, fit_tokenizer, smooth_trajectories

pytestmark = pytest.mark.unit

# tiny sizes with A=3 <= H=4, so that a 150-step fit can reconstruct well (A=7 into H=4 cannot)
CFG = RSDConfig.tiny(action_dim=3)  # C=4 A=3 H=4 L=4 G=5 width=16


def make(seed: int = 0) -> RFSQTokenizer:
    torch.manual_seed(seed)
    return RFSQTokenizer.from_config(CFG)


def data(n: int, seed: int) -> torch.Tensor:
    return smooth_trajectories(n, CFG.chunk_len, CFG.action_dim, seed=seed)


@pytest.fixture(scope="module")
def fitted() -> tuple[RFSQTokenizer, TokenizerFitReport, TokenizerFitReport]:
    """(tokenizer, report before training (steps=0), report after a short fit)."""
    tok = make()
    train, val = data(512, seed=0), data(128, seed=1)
    before = fit_tokenizer(tok, train, steps=0, val_chunks=val, progress=False)
    after = fit_tokenizer(tok, train, steps=150, batch_size=64, lr=1e-2, val_chunks=val, seed=0, progress=False)
    return tok, before, after


def test_short_fit_reconstructs_much_better_than_untrained(fitted) -> None:
    _, before, after = fitted
    assert after.val.mse < before.val.mse / 20, (before.val.mse, after.val.mse)
    assert after.val.mse < 2e-2  # measured 2026-11-26: 4.5e-3 (untrained 0.47)
    assert after.steps == 150 and after.batch_size == 64 and after.wall_seconds > 0


def test_report_shapes_and_consistency(fitted) -> None:
    tok, _, report = fitted
    L, G, A = CFG.num_layers, CFG.num_levels, CFG.action_dim
    for split, n in ((report.train, 512), (report.val, 128)):
        assert split.num_chunks == n
        assert len(split.mse_per_dim) == A and all(np.isfinite(split.mse_per_dim))
        assert split.mse == pytest.approx(float(np.mean(split.mse_per_dim)), rel=1e-12)
        assert len(split.mse_by_layers) == L
        assert split.mse_by_layers[-1] == pytest.approx(split.mse, rel=1e-9)
        assert len(split.levels_used) == L and len(split.usage) == L
        for row, used in zip(split.usage, split.levels_used):
            assert len(row) == G and sum(row) == pytest.approx(1.0)
            assert used == sum(f > 0 for f in row)
    # the reported MSE is the MSE of decode_from_indices(encode(x)), recomputed here independently
    val = data(128, seed=1)
    with torch.no_grad():
        per_dim = (tok.decode_from_indices(tok.encode(val)) - val).double().pow(2).mean(dim=(0, 1))
    assert np.allclose(report.val.mse_per_dim, per_dim.numpy(), rtol=1e-6)


def test_coarse_to_fine_mse_and_every_layer_alive(fitted) -> None:
    _, _, report = fitted
    for split in (report.train, report.val):
        by_k = split.mse_by_layers
        for k in range(len(by_k) - 1):
            assert by_k[k + 1] <= by_k[k] * (1 + 1e-3) + 1e-8, by_k
        assert by_k[-1] < by_k[0] / 4, by_k  # the residual layers carry real information
        assert min(split.levels_used) >= 2, split.levels_used


def test_report_to_dict_is_json(fitted) -> None:
    _, _, report = fitted
    d = json.loads(json.dumps(report.to_dict()))
    assert d["steps"] == 150 and len(d["train"]["usage"]) == CFG.num_layers
    assert d["val"]["mse_per_dim"] == list(report.val.mse_per_dim)
    with pytest.raises(AttributeError):
        report.steps = 1  # frozen


def test_fit_is_deterministic_and_accepts_numpy() -> None:
    x = data(64, seed=2)
    reports = [fit_tokenizer(make(5), chunks, steps=10, batch_size=16, seed=3, progress=False)
               for chunks in (x, x.double().numpy())]
    a, b = (r.to_dict() for r in reports)
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b
    c = fit_tokenizer(make(5), x, steps=10, batch_size=16, seed=4, progress=False).to_dict()
    assert c["train"]["mse"] != a["train"]["mse"]  # the RNG seed drives the batches


def test_progress_bar_only_when_asked(capsys) -> None:
    x = data(16, seed=0)
    fit_tokenizer(make(), x, steps=2, batch_size=4, progress=False)
    assert capsys.readouterr().err == ""
    fit_tokenizer(make(), x, steps=2, batch_size=4, progress=True)
    assert "fit tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "chunks, kwargs, error, pattern",
    [
        ([[0.0]], {}, ShapeError, r"torch.Tensor or numpy array \[N, C, A\].*list"),
        (torch.zeros(8, 5, 3), {}, ShapeError, r"\[N >= 1, 4, 3\].*\(8, 5, 3\)"),
        (torch.zeros(0, 4, 3), {}, ShapeError, r"\(0, 4, 3\)"),
        (torch.zeros(8, 4, 3, dtype=torch.int64), {}, DTypeError, r"floats.*int64"),
        (np.zeros((8, 4, 3), np.int32), {}, DTypeError, r"floats.*int32"),
        (torch.full((8, 4, 3), float("nan")), {}, NonFiniteError, r"96 NaN/inf"),
        (torch.zeros(8, 4, 3), {"steps": -1}, ConfigError, r"`steps` must be an int >= 0, got -1"),
        (torch.zeros(8, 4, 3), {"batch_size": 0}, ConfigError, r"`batch_size`.*got 0"),
        (torch.zeros(8, 4, 3), {"lr": 0.0}, ConfigError, r"`lr`.*got 0.0"),
        (torch.zeros(8, 4, 3), {"lr": float("nan")}, ConfigError, r"`lr`"),
        (torch.zeros(8, 4, 3), {"val_chunks": torch.zeros(8, 4, 7)}, ShapeError, r"`val_chunks`.*\(8, 4, 7\)"),
    ],
)
def test_bad_inputs_raise(chunks, kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        fit_tokenizer(make(), chunks, **{"steps": 1, "progress": False, **kwargs})


def test_non_tokenizer_raises() -> None:
    with pytest.raises(ConfigError, match="RFSQTokenizer"):
        fit_tokenizer(torch.nn.Linear(3, 3), data(4, 0), steps=1, progress=False)


def test_diverging_loss_raises() -> None:
    with pytest.raises(NonFiniteError, match="lower `lr`"):
        fit_tokenizer(make(), data(32, 0), steps=5, batch_size=8, lr=1e30, progress=False)


# synthetic data


def test_smooth_trajectories() -> None:
    x = smooth_trajectories(256, 8, 7, seed=0)
    assert x.shape == (256, 8, 7) and x.dtype == torch.float32
    assert float(x.abs().max()) <= 1.0
    assert torch.equal(x, smooth_trajectories(256, 8, 7, seed=0))
    assert not torch.equal(x, smooth_trajectories(256, 8, 7, seed=1))
    gripper, smooth = x[..., -1], x[..., :-1]
    assert set(gripper.unique().tolist()) == {-1.0, 1.0}
    assert int((gripper.diff(dim=1) != 0).sum(dim=1).max()) <= 1  # at most one flip per chunk
    # smooth: a step moves at most 2*pi*0.08 * amplitude (< 0.46); on average far less than the spread
    steps = smooth.diff(dim=1).abs()
    assert float(steps.max()) < 0.46 and float(steps.mean()) < 0.25 * float(smooth.std())
    assert float(smooth.std()) > 0.2  # and not degenerate
    with pytest.raises(ConfigError, match="`n`"):
        smooth_trajectories(0, 8, 7, seed=0)

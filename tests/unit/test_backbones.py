"""Backbone contract, registry, hidden-state check and TinyBackbone (CPU, no transformers import)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rsd.backbones import (
    Backbone,
    TinyBackbone,
    backbone_spec,
    build_backbone,
    check_hidden,
    load_backbone,
    register_backbone,
    registered_backbones,
    save_backbone,
)
from rsd.backbones.hf import HFBackbone, hf_offline_mode, last_real_token_index
from rsd.backbones.tiny import WEIGHTS_FILE, instruction_buckets_of, stable_bucket
from rsd.config import RSDConfig
from rsd.observation import ObservationSpec
from rsd.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    DeadHiddenStateError,
    DTypeError,
    NonFiniteError,
    ShapeError,
)

pytestmark = pytest.mark.unit

CFG = RSDConfig.tiny()
S = 32  # test image size


def make_obs(batch: int | None = None, size: int = S, seed: int = 0) -> dict:
    """A valid observation (rsd.observation) for a TinyBackbone of image_size ``size``; batch=None: unbatched."""
    return ObservationSpec(image_size=size, proprio_dim=CFG.proprio_dim).fake(seed, batch=batch)


@pytest.fixture(scope="module")
def tiny() -> TinyBackbone:
    return TinyBackbone(hidden_dim=CFG.hidden_dim, image_size=S, instruction_buckets=256)


# TinyBackbone: shapes and content


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("use_wrist", [True, False])
def test_tiny_shapes(batch: int, use_wrist: bool) -> None:
    backbone = TinyBackbone(hidden_dim=CFG.hidden_dim, image_size=S, use_wrist=use_wrist)
    obs = make_obs(batch)
    if not use_wrist:
        del obs["wrist_image"]
    hidden = backbone.encode(obs, "pick up the black bowl")
    assert hidden.shape == (batch, CFG.hidden_dim) and hidden.dtype == torch.float32
    assert torch.isfinite(hidden).all()
    # the per-element instruction list gives the same result as the shared str
    assert torch.equal(hidden, backbone.encode(obs, ["pick up the black bowl"] * batch))


def test_tiny_unbatched_is_batch_of_one_and_rows_are_independent(tiny: TinyBackbone) -> None:
    batch = make_obs(3)
    hidden = tiny.encode(batch, ["open the drawer", "close the drawer", "turn on the stove"])
    for i, text in enumerate(["open the drawer", "close the drawer", "turn on the stove"]):
        single = {key: value[i] for key, value in batch.items()}
        one = tiny.encode(single, text)
        assert one.shape == (1, CFG.hidden_dim)
        assert torch.allclose(one[0], hidden[i], rtol=1e-5, atol=1e-6), (one[0] - hidden[i]).abs().max()


def test_tiny_accepts_torch_tensors(tiny: TinyBackbone) -> None:
    obs = make_obs(2)
    as_torch = {key: torch.from_numpy(value) for key, value in obs.items()}
    assert torch.equal(tiny.encode(obs, "put the bowl on the plate"), tiny.encode(as_torch, "put the bowl on the plate"))


def test_tiny_instruction_changes_hidden(tiny: TinyBackbone) -> None:
    obs = make_obs()
    a = tiny.encode(obs, "put the bowl on the plate")
    b = tiny.encode(obs, "open the top drawer")
    swapped = tiny.encode(obs, "put the plate on the bowl")  # same words, other order: bigrams differ
    assert not torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, swapped, atol=1e-4)
    assert torch.equal(a, tiny.encode(obs, "Put the BOWL on the plate."))  # lowercase words, punctuation ignored


def test_tiny_images_and_state_change_hidden(tiny: TinyBackbone) -> None:
    obs = make_obs(seed=0)
    base = tiny.encode(obs, "open the drawer")
    for key in ("full_image", "wrist_image", "state"):
        changed = dict(obs, **{key: make_obs(seed=1)[key]})
        assert not torch.allclose(base, tiny.encode(changed, "open the drawer"), atol=1e-5), key


def test_tiny_at_224_and_gradients_flow() -> None:
    backbone = TinyBackbone(hidden_dim=CFG.hidden_dim)  # image_size 224, the LIBERO size
    hidden = backbone.encode(make_obs(2, size=224), "open the drawer")
    hidden.square().mean().backward()
    grads = [p.grad for p in backbone.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)


def test_tiny_seeded_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = TinyBackbone(hidden_dim=8, image_size=S, seed=5)
    assert torch.equal(before, torch.get_rng_state())
    b = TinyBackbone(hidden_dim=8, image_size=S, seed=5)
    c = TinyBackbone(hidden_dim=8, image_size=S, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# the instruction hash


def test_stable_bucket_is_pinned() -> None:
    """blake2b buckets do not depend on the process (Python's hash() is salted per process)."""
    assert stable_bucket("bowl", 4096) == 2007
    assert stable_bucket("pick", 4096) == 2279
    assert stable_bucket("pick up", 4096) == stable_bucket("pick up", 4096)
    assert instruction_buckets_of("Pick, BOWL", 4096) == [2279, 2007, stable_bucket("pick bowl", 4096)]


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=1, max_size=20), st.integers(1, 10_000))
def test_stable_bucket_in_range(token: str, buckets: int) -> None:
    assert 0 <= stable_bucket(token, buckets) < buckets


# TinyBackbone: loud failures


@pytest.mark.parametrize("key", ["full_image", "wrist_image", "state"])
def test_tiny_missing_key_names_it(tiny: TinyBackbone, key: str) -> None:
    obs = make_obs()
    del obs[key]
    with pytest.raises(ShapeError, match=key):
        tiny.encode(obs, "open the drawer")


def test_tiny_missing_wrist_camera_says_how_to_do_without(tiny: TinyBackbone) -> None:
    obs = make_obs()
    del obs["wrist_image"]
    with pytest.raises(ShapeError, match=r"render the episode.*use_wrist=False"):
        tiny.encode(obs, "open the drawer")


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("full_image", np.zeros((S, S, 3), np.float32), DTypeError),
        ("full_image", np.zeros((S + 1, S, 3), np.uint8), ShapeError),
        ("full_image", np.zeros((S, S), np.uint8), ShapeError),
        ("wrist_image", np.zeros((2, S, S, 3), np.uint8), ShapeError),  # batched among unbatched
        ("state", np.zeros(7, np.float32), ShapeError),
        ("state", np.zeros(8, np.int64), DTypeError),
        ("state", np.full(8, np.nan, np.float32), NonFiniteError),
        ("state", [0.0] * 8, DTypeError),
    ],
)
def test_tiny_rejects_bad_inputs(tiny: TinyBackbone, key: str, value, error: type) -> None:
    obs = make_obs()
    obs[key] = value
    with pytest.raises(error, match=key):
        tiny.encode(obs, "open the drawer")


def test_tiny_rejects_batch_disagreements(tiny: TinyBackbone) -> None:
    obs = make_obs(3)
    obs["state"] = obs["state"][:2]
    with pytest.raises(ShapeError, match="batch"):
        tiny.encode(obs, "open the drawer")
    with pytest.raises(ShapeError, match="2 instructions for a batch of 3"):
        tiny.encode(make_obs(3), ["a", "b"])
    with pytest.raises(ShapeError, match="no words"):
        tiny.encode(make_obs(), "  ?! ")


@pytest.mark.parametrize("kwargs", [dict(hidden_dim=0), dict(image_size=4), dict(use_wrist=1), dict(width=2.0)])
def test_tiny_rejects_bad_config(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        TinyBackbone(**kwargs)


# protocol, registry


def test_protocol() -> None:
    assert isinstance(TinyBackbone(hidden_dim=8, image_size=S), Backbone)
    assert not isinstance(object(), Backbone)
    assert {"tiny", "hf"} <= set(registered_backbones())


def test_build_backbone_by_name() -> None:
    backbone = build_backbone("tiny", hidden_dim=CFG.hidden_dim, image_size=S)
    assert isinstance(backbone, TinyBackbone) and backbone.hidden_dim == CFG.hidden_dim


def test_unknown_backbone_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"Unknown backbone 'tinny'\. Did you mean 'tiny'\?") as info:
        build_backbone("tinny")
    assert "Known backbones" in str(info.value) and "'hf'" in str(info.value)
    with pytest.raises(ConfigError, match="Known backbones") as info:
        build_backbone("zzzzzzzz")
    assert "Did you mean" not in str(info.value)


def test_register_duplicate_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        @register_backbone("tiny")
        class Other:  # noqa: F841 (never registered)
            hidden_dim = 1


# check_hidden


def test_check_hidden_passes_good_hidden_through() -> None:
    hidden = torch.ones(3, 4)
    assert check_hidden(hidden, 4) is hidden


@pytest.mark.parametrize(
    ("hidden", "error", "match"),
    [
        (torch.tensor([[1.0, 2.0], [0.0, 0.0]]), DeadHiddenStateError, r"all zero in batch rows \[1\]"),
        (torch.tensor([[1.0, float("nan")], [1.0, 1.0]]), DeadHiddenStateError, r"NaN/inf in batch rows \[0\]"),
        (torch.tensor([[1.0, 1.0], [float("inf"), 1.0]]), DeadHiddenStateError, r"NaN/inf in batch rows \[1\]"),
        (torch.ones(2, 3), ShapeError, r"\[B, 2\]"),
        (torch.ones(2), ShapeError, r"\[B, 2\]"),
        (torch.ones(1, 2, 2), ShapeError, r"\[B, 2\]"),
        (torch.ones(0, 2), ShapeError, r"B >= 1"),
        (torch.ones(2, 2, dtype=torch.int64), DTypeError, "floating"),
        (np.ones((2, 2), np.float32), DTypeError, "floating"),
    ],
)
def test_check_hidden_raises(hidden, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        check_hidden(hidden, 2)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_check_hidden_accepts_finite_nonzero(batch: int, dim: int, seed: int) -> None:
    hidden = torch.rand(batch, dim, generator=torch.Generator().manual_seed(seed)) + 0.1
    assert check_hidden(hidden, dim) is hidden


# save / load


def test_tiny_save_load_round_trip(tmp_path, tiny: TinyBackbone) -> None:
    spec = save_backbone(tiny, tmp_path)
    assert spec == backbone_spec(tiny) == json.loads(json.dumps(spec))  # JSON-able
    assert spec["name"] == "tiny" and spec["kwargs"]["hidden_dim"] == CFG.hidden_dim
    assert (tmp_path / WEIGHTS_FILE).is_file()
    with torch.no_grad():  # make the saved weights differ from a fresh seed-0 init
        tiny_changed = TinyBackbone(**spec["kwargs"])
        tiny_changed.load_state_dict(tiny.state_dict())
        tiny_changed.fuse[1].bias.add_(1.0)
    spec = save_backbone(tiny_changed, tmp_path)
    loaded = load_backbone(spec, tmp_path)
    obs = make_obs(2)
    assert torch.equal(loaded.encode(obs, "open the drawer"), tiny_changed.encode(obs, "open the drawer"))
    assert not torch.equal(loaded.encode(obs, "open the drawer"), tiny.encode(obs, "open the drawer"))


def test_tiny_load_failures(tmp_path, tiny: TinyBackbone) -> None:
    spec = backbone_spec(tiny)
    with pytest.raises(CheckpointNotFoundError, match=WEIGHTS_FILE):
        load_backbone(spec, tmp_path)
    save_backbone(tiny, tmp_path)
    wider = {"name": "tiny", "kwargs": dict(spec["kwargs"], hidden_dim=CFG.hidden_dim * 2)}
    with pytest.raises(CheckpointMismatchError, match="shape"):
        load_backbone(wider, tmp_path)
    no_wrist = {"name": "tiny", "kwargs": dict(spec["kwargs"], use_wrist=False)}
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        load_backbone(no_wrist, tmp_path)
    with pytest.raises(ConfigError, match="colour"):
        load_backbone({"name": "tiny", "kwargs": dict(spec["kwargs"], colour="red")}, tmp_path)
    with pytest.raises(ConfigError, match="exactly the keys"):
        load_backbone({"name": "tiny"}, tmp_path)
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        load_backbone({"name": "tiyn", "kwargs": {}}, tmp_path)


def test_backbone_spec_needs_registered_class() -> None:
    class Anonymous:
        hidden_dim = 2

        def encode(self, observation, instruction, *, check=True):
            return torch.ones(1, 2)

    with pytest.raises(ConfigError, match="register_backbone"):
        backbone_spec(Anonymous())


# HF helpers that need no transformers import


@pytest.mark.parametrize("side", ["left", "right"])
@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5), extra=st.integers(0, 4))
def test_last_real_token_index(side: str, lengths: list[int], extra: int) -> None:
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n:] = 1
    expected = [(n - 1 if side == "right" else width - 1) for n in lengths]
    assert last_real_token_index(mask).tolist() == expected
    # a model that splices `extra` tokens (image patches) in before the text shifts every index by `extra`
    assert last_real_token_index(mask, sequence_length=width + extra).tolist() == [e + extra for e in expected]


def test_last_real_token_index_errors() -> None:
    with pytest.raises(ShapeError, match=r"rows \[1\] have no real token"):
        last_real_token_index(torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ShapeError, match=r"\[B, T\]"):
        last_real_token_index(torch.ones(3))
    with pytest.raises(ShapeError, match="dropped tokens"):
        last_real_token_index(torch.ones(1, 4), sequence_length=3)


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hf_offline_mode_reads_env(monkeypatch, var: str, value: str, offline: bool) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(var, value)
    assert hf_offline_mode() is offline


@pytest.mark.parametrize("path", ["/nonexistent/rsd-model", "./no/such/dir", "a/b/c"])
def test_hf_missing_path_raises(path: str) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        HFBackbone.from_pretrained(path)


def test_hf_dir_without_config_raises(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        HFBackbone.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(prompt_template="no placeholder"), "instruction"), (dict(padding_side="middle"), "padding_side"),
     (dict(dtype="float8"), "dtype"), (dict(trust_remote_code="yes"), "trust_remote_code")],
)
def test_hf_rejects_bad_options(tmp_path, kwargs: dict, match: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=match):
        HFBackbone.from_pretrained(tmp_path, **kwargs)


# speed


@pytest.mark.benchmark(group="backbone")
def test_tiny_encode_speed_224(benchmark) -> None:
    backbone = TinyBackbone(hidden_dim=CFG.hidden_dim)
    obs = make_obs(size=224)
    with torch.inference_mode():
        hidden = benchmark.pedantic(backbone.encode, args=(obs, "pick up the black bowl"), rounds=20,
                                    warmup_rounds=3)
    assert hidden.shape == (1, CFG.hidden_dim)

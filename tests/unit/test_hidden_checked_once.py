"""The hidden state's values are checked once per chunk, where the backbone hands it over (``check_hidden``,
one host sync): backbones keep an opt-in check (``encode(..., check=True)``, the default) and the heads,
the draft, greedy / speculative decoding and the graphed decode never re-check it. Those paths read no
tensor value at all where they claim no host sync."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import rsd.backbones
import rsd.backbones.base
from rsd.backbones import OpenVLAShapedBackbone, TinyBackbone
from rsd.config import RSDConfig
from rsd.errors import NonFiniteError
from rsd.fastpath import greedy_decode_packed
from rsd.heads import DraftHead, L1ActionHead, RFSQHead
from rsd.speculative import SpeculativeDecoder, greedy_decode
from rsd.tokenizer import RFSQTokenizer
from tests._openvla_tiny import tiny_observation

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[2] / "rsd"
CFG = RSDConfig.tiny()
DECODING = ("heads.py", "speculative.py", "fastpath.py")
HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy")


def parts(seed: int = 0) -> tuple[RFSQHead, DraftHead, RFSQTokenizer, torch.Tensor]:
    torch.manual_seed(seed)
    hidden = torch.randn(2, CFG.hidden_dim, generator=torch.Generator().manual_seed(seed + 1))
    return RFSQHead(CFG).eval(), DraftHead(CFG).eval(), RFSQTokenizer.from_config(CFG).eval(), hidden


@pytest.mark.parametrize("module", DECODING)
def test_decoding_modules_never_name_check_hidden(module: str) -> None:
    tree = ast.parse((PKG / module).read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "check_hidden" not in names, f"rsd/{module} re-checks the hidden state; the policy checks it once."


def test_heads_and_decoders_do_not_call_check_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("check_hidden called after the backbone boundary")

    monkeypatch.setattr(rsd.backbones.base, "check_hidden", refuse)
    monkeypatch.setattr(rsd.backbones, "check_hidden", refuse)
    head, draft, tok, hidden = parts()
    with torch.inference_mode():
        greedy = greedy_decode(head, hidden)
        codes, _ = SpeculativeDecoder(draft, head).decode(hidden)
        assert torch.equal(codes, greedy)
        assert torch.equal(greedy_decode_packed(head, tok, hidden)[0], greedy)
        head(hidden), draft(hidden), L1ActionHead(CFG)(hidden)


def test_the_no_sync_paths_read_no_tensor_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA graph captures (and what the speculative decoder calls with validate=False) never moves a
    value to the host: any such read raises here."""
    head, draft, tok, hidden = parts(1)
    with torch.inference_mode():
        greedy = greedy_decode(head, hidden)
        prefix = draft(hidden).argmax(dim=-1)  # [B, k, C, H]
        reference = head.teacher_forced(head.start(hidden), prefix)
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, _refuse_host_read(name), raising=False)
        with pytest.raises(AssertionError, match="__bool__"):
            bool(torch.ones(()) > 0)  # the trap is set
        state = head.start(hidden)
        layers, _ = head.rollout(state)
        logits, states = head.teacher_forced(state, prefix, validate=False, return_states=True)
        after = head.advance(states[-1], prefix[:, -1], validate=False)
        head.rollout(after, layers, validate=False)
        actions = tok.decode_from_indices(greedy, validate=False)
        codes, packed_actions, flags, packed = greedy_decode_packed(head, tok, hidden)
        monkeypatch.undo()
    assert torch.equal(logits, reference) and torch.equal(codes, greedy) and torch.equal(packed_actions, actions)
    assert flags.tolist() == [True, True, True]


def _refuse_host_read(name: str):  # noqa: ANN202 - a method stand-in
    def refuse(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"Tensor.{name} read a value on the host (a sync) on a path that must not")
    return refuse


def test_the_heads_do_not_read_the_hidden_values() -> None:
    """NaN goes through the heads unread (their check is the layout); the logits check of greedy decoding
    still stops it, and names the hidden state as a suspect."""
    head, draft, _, hidden = parts(2)
    nan = torch.full_like(hidden, float("nan"))
    with torch.inference_mode():
        head.start(nan), draft(nan), L1ActionHead(CFG)(nan)
        with pytest.raises(NonFiniteError, match="main_head.*hidden state"):
            greedy_decode(head, nan)


# the backbones' opt-in check


def _tiny_backbone_with_nan() -> tuple[TinyBackbone, dict]:
    backbone = TinyBackbone(hidden_dim=CFG.hidden_dim, image_size=28, instruction_buckets=64)
    with torch.no_grad():
        backbone.fuse[-1].bias.fill_(float("nan"))
    return backbone, tiny_observation(0)


def _shaped_backbone_with_nan() -> tuple[OpenVLAShapedBackbone, dict]:
    backbone = OpenVLAShapedBackbone("tiny", device="cpu", seed=3)
    with torch.no_grad():
        backbone.model.language_model.model.norm.weight.fill_(float("nan"))
    return backbone, tiny_observation(1)


@pytest.mark.parametrize("make", [_tiny_backbone_with_nan, _shaped_backbone_with_nan], ids=["tiny", "openvla-shaped"])
def test_backbone_encode_checks_unless_asked_not_to(make) -> None:  # noqa: ANN001
    backbone, obs = make()
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        backbone.encode(obs, "open the drawer")
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        backbone.encode(obs, "open the drawer", check=True)
    hidden = backbone.encode(obs, "open the drawer", check=False)
    assert hidden.shape == (1, backbone.hidden_dim) and hidden.dtype == torch.float32
    assert bool(torch.isnan(hidden).all())

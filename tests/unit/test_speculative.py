"""Speculative decoding: `exact` == greedy for any weights, partial/per-element acceptance, rule boundaries, stats."""

import json

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from rsd.config import RSDConfig
from rsd.errors import ConfigError, NonFiniteError, ShapeError
from rsd.heads import DraftHead, RFSQHead
from rsd.layout import codes_to_layers, layers_to_codes
from rsd.speculative import SpecStats, SpeculativeDecoder, greedy_decode

pytestmark = pytest.mark.unit

CFG = RSDConfig.tiny()  # C=4 H=4 L=4 G=5 D=32 k=2
C, H, L, G, D, K = CFG.chunk_len, CFG.latent_dim, CFG.num_layers, CFG.num_levels, CFG.hidden_dim, CFG.draft_layers


class FixedDraft(DraftHead):
    """A draft whose proposals are given by ``propose(hidden) -> codes [B, k, C, H]`` (one-hot logits).

    The draft network still runs (so validation and cost are real); its output is replaced.
    """

    def __init__(self, cfg, propose):
        super().__init__(cfg)
        self.propose = propose

    def forward(self, hidden):
        super().forward(hidden)
        return torch.nn.functional.one_hot(self.propose(hidden), self.cfg.num_levels).float()


def heads(seed: int, cfg: RSDConfig = CFG) -> tuple[DraftHead, RFSQHead]:
    torch.manual_seed(seed)
    return DraftHead(cfg), RFSQHead(cfg)


def hidden_of(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(seed))


def greedy_layers(main: RFSQHead, hidden: torch.Tensor) -> torch.Tensor:
    """[B, L, C, H] via the module's own rollout (independent of rsd.speculative)."""
    with torch.no_grad():
        return main(hidden).argmax(dim=-1)


def rollout_after(main: RFSQHead, hidden: torch.Tensor, prefix: torch.Tensor, lengths=None) -> torch.Tensor:
    """Reference: element b forces ``prefix[b, :lengths[b]]`` (default: all P layers), then greedy -> [B, L, C, H]."""
    lengths = torch.full((hidden.shape[0],), prefix.shape[1]) if lengths is None else torch.as_tensor(lengths)
    with torch.no_grad():
        state, layers = main.start(hidden), []
        for layer in range(L):
            greedy = main.step(state).argmax(dim=-1)
            forced = prefix[:, min(layer, prefix.shape[1] - 1)]
            layers.append(torch.where((lengths > layer)[:, None, None], forced, greedy))
            if layer + 1 < L:
                state = main.advance(state, layers[layer])
        return torch.stack(layers, dim=1)


def spoil(layers: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Change token (c=0, h=0) by +1 level (mod G) in the layers of ``where`` [B, k] bool."""
    spoiled = layers.clone()
    spoiled[..., 0, 0] = torch.where(where, (layers[..., 0, 0] + 1) % G, layers[..., 0, 0])
    return spoiled


# greedy


def test_greedy_decode_is_argmax_of_forward_in_decoder_layout():
    _, main = heads(0)
    hidden = hidden_of(3, 1)
    codes = greedy_decode(main, hidden)
    assert codes.shape == (3, C, H, L) and codes.dtype == torch.int64
    assert torch.equal(codes, layers_to_codes(greedy_layers(main, hidden)))


# exact == greedy


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 4), st.integers(1, L))
def test_exact_equals_greedy_with_random_draft(seed, batch, k):
    cfg = RSDConfig.tiny(draft_layers=k)
    draft, main = heads(seed, cfg)
    hidden = hidden_of(batch, seed + 1)
    codes, stats = SpeculativeDecoder(draft, main).decode(hidden)
    assert torch.equal(codes, greedy_decode(main, hidden))
    assert len(stats.accepted_layers) == batch and all(0 <= a <= k for a in stats.accepted_layers)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, L), st.data())
def test_exact_equals_greedy_and_accepts_the_agreeing_prefix(seed, k, data):
    """Draft copies greedy on a random [B, k] mask of layers: each element accepts its leading run of copies."""
    batch = data.draw(st.integers(1, 4))
    rows = st.lists(st.booleans(), min_size=k, max_size=k)
    copy = torch.tensor(data.draw(st.lists(rows, min_size=batch, max_size=batch)))  # [B, k]
    cfg = RSDConfig.tiny(draft_layers=k)
    _, main = heads(seed, cfg)
    hidden = hidden_of(batch, seed + 1)
    draft = FixedDraft(cfg, lambda x: spoil(greedy_layers(main, x)[:, :k], ~copy))
    codes, stats = SpeculativeDecoder(draft, main).decode(hidden)
    assert torch.equal(codes, greedy_decode(main, hidden))
    expected = copy.long().cumprod(dim=1).sum(dim=1)
    assert stats.accepted_layers == tuple(expected.tolist())
    assert stats.acceptance_rate == pytest.approx([(expected > layer).double().mean().item() for layer in range(k)])
    start = min(int(expected.min()) + 1, L)  # every element knows its accepted layers + the bonus layer
    assert stats.main_steps == 1 + L - start and stats.draft_steps == 1 and stats.greedy_steps == L


def test_disagreeing_draft_is_rejected():
    _, main = heads(1)
    hidden = hidden_of(3, 2)
    draft = FixedDraft(CFG, lambda x: (greedy_layers(main, x)[:, :K] + 1) % G)  # every token off by one
    codes, stats = SpeculativeDecoder(draft, main).decode(hidden)
    assert torch.equal(codes, greedy_decode(main, hidden))
    assert stats.accepted_layers == (0, 0, 0)
    assert stats.acceptance_rate == (0.0,) * K
    assert stats.token_match_rate[0] == 0.0  # layer 0 is judged against the true greedy layer 0
    assert stats.main_steps == L  # verify pass (gives layer 0) + L - 1 sequential steps


def test_partial_acceptance_copying_layer_zero_only():
    _, main = heads(2)
    hidden = hidden_of(2, 3)
    draft = FixedDraft(CFG, lambda x: spoil(greedy_layers(main, x)[:, :K], torch.tensor([[False, True]] * 2)))
    codes, stats = SpeculativeDecoder(draft, main).decode(hidden)
    assert torch.equal(codes, greedy_decode(main, hidden))
    assert stats.accepted_layers == (1, 1)
    assert stats.acceptance_rate == (1.0, 0.0)
    assert stats.token_match_rate == (1.0, 1.0 - 1.0 / (C * H))  # exactly one spoiled token in layer 1
    assert stats.main_steps == 1 + L - 2  # layers 0 (draft) and 1 (bonus) known after the verify pass


@pytest.mark.parametrize("k", [K, L])
def test_fully_agreeing_draft_saves_main_steps(k):
    cfg = RSDConfig.tiny(draft_layers=k)
    _, main = heads(3, cfg)
    hidden = hidden_of(2, 4)
    draft = FixedDraft(cfg, lambda x: greedy_layers(main, x)[:, :k])
    codes, stats = SpeculativeDecoder(draft, main).decode(hidden)
    assert torch.equal(codes, greedy_decode(main, hidden))
    assert stats.accepted_layers == (k, k) and stats.acceptance_rate == (1.0,) * k
    assert stats.token_match_rate == (1.0,) * k
    assert stats.main_steps == (L - k if k < L else 1) < stats.greedy_steps == L


def test_each_element_is_judged_on_its_own():
    _, main = heads(4)
    hidden = hidden_of(2, 5)
    spoiled = torch.tensor([[False, False], [True, True]])  # element 0 agrees, element 1 disagrees
    draft = FixedDraft(CFG, lambda x: spoil(greedy_layers(main, x)[:, :K], spoiled))
    codes, stats = SpeculativeDecoder(draft, main).decode(hidden)
    assert torch.equal(codes, greedy_decode(main, hidden))
    assert stats.accepted_layers == (K, 0) and stats.acceptance_rate == (0.5,) * K
    assert stats.main_steps == L  # the batch steps from layer 1 on; element 0 keeps its codes


# relaxed and match_rate boundaries


def shifted_layer0(main: RFSQHead, hidden: torch.Tensor, tokens: int, levels: int) -> torch.Tensor:
    """Greedy draft layers with the first ``tokens`` tokens of layer 0 moved by exactly ``levels`` (in range)."""
    layers = greedy_layers(main, hidden)[:, :K].clone()
    flat = rearrange(layers[:, 0], "b c h -> b (c h)").clone()  # token t = c*H + h
    moved = torch.where(flat[:, :tokens] + levels < G, flat[:, :tokens] + levels, flat[:, :tokens] - levels)
    flat[:, :tokens] = moved
    layers[:, 0] = rearrange(flat, "b (c h) -> b c h", c=C)
    return layers


@pytest.mark.parametrize("levels", [1, 2])
def test_relaxed_threshold_boundary(levels):
    _, main = heads(5)
    hidden = hidden_of(2, 6)
    proposal = shifted_layer0(main, hidden, tokens=3, levels=levels)
    draft = FixedDraft(CFG, lambda x: proposal)
    codes, stats = SpeculativeDecoder(draft, main, "relaxed", levels).decode(hidden)  # |diff| == threshold: accept
    assert min(stats.accepted_layers) >= 1
    # accepted layers keep the draft's codes; the main continues from them (layer 1 may or may not pass)
    assert torch.equal(codes_to_layers(codes), rollout_after(main, hidden, proposal, stats.accepted_layers))
    _, stats = SpeculativeDecoder(draft, main, "relaxed", levels - 1).decode(hidden)  # one level short: reject
    assert stats.accepted_layers == (0, 0)


def test_relaxed_zero_equals_exact():
    _, main = heads(6)
    hidden = hidden_of(3, 7)
    spoiled = torch.tensor([[False, True], [True, False], [False, False]])
    draft = FixedDraft(CFG, lambda x: spoil(greedy_layers(main, x)[:, :K], spoiled))
    exact = SpeculativeDecoder(draft, main).decode(hidden)
    relaxed = SpeculativeDecoder(draft, main, "relaxed", 0).decode(hidden)
    assert torch.equal(exact[0], relaxed[0]) and exact[1].accepted_layers == relaxed[1].accepted_layers == (1, 0, 2)


def test_match_rate_threshold_boundary():
    _, main = heads(7)
    hidden = hidden_of(1, 8)
    proposal = shifted_layer0(main, hidden, tokens=4, levels=1)  # layer 0: 12 of 16 tokens equal = 0.75
    draft = FixedDraft(CFG, lambda x: proposal)
    for threshold, accepted in [(0.75, True), (0.76, False), (None, True)]:  # None -> the default 0.7
        codes, stats = SpeculativeDecoder(draft, main, "match_rate", threshold).decode(hidden)
        assert (stats.accepted_layers[0] >= 1) is accepted, threshold
        assert stats.token_match_rate[0] == 0.75
    assert stats.threshold == 0.7
    codes, stats = SpeculativeDecoder(draft, main, "match_rate", 0.0).decode(hidden)
    assert stats.accepted_layers == (K,)
    assert torch.equal(codes_to_layers(codes), rollout_after(main, hidden, proposal))
    five_off = shifted_layer0(main, hidden, tokens=5, levels=1)  # 11/16 = 0.6875 < 0.7
    _, stats = SpeculativeDecoder(FixedDraft(CFG, lambda x: five_off), main, "match_rate").decode(hidden)
    assert stats.accepted_layers == (0,)


# stats


def test_stats_are_json_and_frozen():
    draft, main = heads(8)
    _, stats = SpeculativeDecoder(draft, main, "match_rate", 0.5).decode(hidden_of(2, 9))
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["mode"] == "match_rate" and data["threshold"] == 0.5 and data["greedy_steps"] == L
    assert len(data["accepted_layers"]) == 2 and len(data["acceptance_rate"]) == len(data["token_match_rate"]) == K
    assert data["mean_accepted_layers"] == sum(data["accepted_layers"]) / 2
    with pytest.raises(AttributeError):
        stats.main_steps = 0
    assert isinstance(stats, SpecStats)


# errors


@pytest.mark.parametrize(
    "mode, threshold, words",
    [
        ("greedy", None, "exact, relaxed, match_rate"),
        ("exact", 1, "no threshold"),
        ("relaxed", None, "int >= 0"),
        ("relaxed", -1, "int >= 0"),
        ("relaxed", 1.5, "int >= 0"),
        ("relaxed", True, "int >= 0"),
        ("match_rate", 1.5, r"\[0, 1\]"),
        ("match_rate", -0.1, r"\[0, 1\]"),
        ("match_rate", "0.7", r"\[0, 1\]"),
    ],
)
def test_bad_mode_or_threshold(mode, threshold, words):
    draft, main = heads(0)
    with pytest.raises(ConfigError, match=words):
        SpeculativeDecoder(draft, main, mode, threshold)


def test_incompatible_heads():
    draft, main = heads(0)
    with pytest.raises(ConfigError, match="num_levels"):
        SpeculativeDecoder(DraftHead(RSDConfig.tiny(num_levels=7)), main)
    with pytest.raises(ConfigError, match="DraftHead"):
        SpeculativeDecoder(main, main)
    with pytest.raises(ConfigError, match="RFSQHead"):
        SpeculativeDecoder(draft, draft)
    with pytest.raises(ConfigError, match="RFSQHead"):
        greedy_decode(draft, hidden_of(1, 0))


def test_bad_draft_output_and_broken_weights():
    draft, main = heads(0)
    hidden = hidden_of(2, 1)
    wrong = FixedDraft(CFG, lambda x: torch.zeros(x.shape[0], K + 1, C, H, dtype=torch.int64))
    with pytest.raises(ShapeError, match=r"\[B, k, C, H, G\]"):
        SpeculativeDecoder(wrong, main).decode(hidden)
    with torch.no_grad():
        draft.net[-1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="draft_head"):
        SpeculativeDecoder(draft, main).decode(hidden)
    draft, main = heads(0)
    with torch.no_grad():
        main.out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="main_head"):
        SpeculativeDecoder(draft, main).decode(hidden)
    with pytest.raises(NonFiniteError, match="main_head"):
        greedy_decode(main, hidden)


def test_match_rate_boundary_is_exact_for_non_dyadic_token_counts():
    """7 of C*H = 10 tokens equal is a rate of exactly 0.7, which the match-rate rule (>= 0.7) accepts."""
    cfg = RSDConfig.tiny(chunk_len=5, latent_dim=2)
    _, main = heads(9, cfg)
    hidden = hidden_of(1, 10)
    proposal = greedy_layers(main, hidden)[:, : cfg.draft_layers].clone()
    proposal[:, 0, :3, 0] = (proposal[:, 0, :3, 0] + 1) % cfg.num_levels  # 3 of 10 tokens of layer 0 differ
    draft = FixedDraft(cfg, lambda x: proposal)
    _, stats = SpeculativeDecoder(draft, main, "match_rate").decode(hidden)
    assert stats.token_match_rate[0] == 0.7 and stats.accepted_layers[0] >= 1

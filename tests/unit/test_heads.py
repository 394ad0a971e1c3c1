"""Heads: shapes, causality over layers, teacher forcing == incremental rollout (bitwise), input errors."""

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from rsd.config import RSDConfig
from rsd.errors import CodeRangeError, DTypeError, ShapeError
from rsd.heads import DraftHead, HeadState, L1ActionHead, RFSQHead

pytestmark = pytest.mark.unit

CFG = RSDConfig.tiny()  # C=4 H=4 L=4 G=5 D=32 k=2 W=32
C, H, L, G, D = CFG.chunk_len, CFG.latent_dim, CFG.num_layers, CFG.num_levels, CFG.hidden_dim


def make_head(seed: int, cfg: RSDConfig = CFG) -> RFSQHead:
    torch.manual_seed(seed)
    return RFSQHead(cfg)


def random_hidden(batch: int, seed: int, dim: int = D) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


def random_prefix(batch: int, layers: int, seed: int) -> torch.Tensor:
    return torch.randint(0, G, (batch, layers, C, H), generator=torch.Generator().manual_seed(seed))


def incremental_logits(head: RFSQHead, hidden: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Reference via the public incremental API: step/advance through ``prefix`` -> [B, min(P+1, L), C, H, G]."""
    state = head.start(hidden)
    out = []
    for layer in range(min(prefix.shape[1] + 1, L)):
        out.append(head.step(state))
        if layer < prefix.shape[1] and layer + 1 < L:
            state = head.advance(state, prefix[:, layer])
    return torch.stack(out, dim=1)


# shapes


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_shapes(batch):
    head, hidden = make_head(0), random_hidden(batch, 1)
    assert head(hidden).shape == (batch, L, C, H, G)
    for p in range(L + 1):
        assert head.logits_given_prefix(hidden, random_prefix(batch, p, 2)).shape == (batch, min(p + 1, L), C, H, G)
    state = head.start(hidden)
    assert isinstance(state, HeadState) and state.layer == 0 and state.base.shape == (batch, CFG.head_width)
    assert head.step(state).shape == (batch, C, H, G)
    assert head.advance(state, random_prefix(batch, 1, 3)[:, 0]).layer == 1
    torch.manual_seed(0)
    assert DraftHead(CFG)(hidden).shape == (batch, CFG.draft_layers, C, H, G)
    assert L1ActionHead(CFG)(hidden).shape == (batch, C, CFG.action_dim)


def test_default_sizes_draft_projection_and_head_shapes():
    """Default sizes: the draft's 4096 -> 512 input projection is a checkpoint parameter."""
    cfg = RSDConfig()
    draft = DraftHead(cfg)
    assert draft.state_dict()["net.0.weight"].shape == (512, 4096)
    head = RFSQHead(cfg)
    assert head.logits_given_prefix(random_hidden(1, 0, 4096), torch.zeros(1, 3, 8, 16, dtype=torch.int64)).shape == (
        1, 4, 8, 16, 7)


# causality and exactness


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(0, L - 1))
def test_prefix_causality(seed, batch, j):
    """Changing prefix[:, j] changes no output layer <= j and (generic init) some layer > j."""
    head, hidden = make_head(seed), random_hidden(batch, seed + 1)
    prefix = random_prefix(batch, L, seed + 2)
    changed = prefix.clone()
    changed[:, j] = (changed[:, j] + 1) % G  # every token of layer j differs
    with torch.no_grad():
        before, after = head.logits_given_prefix(hidden, prefix), head.logits_given_prefix(hidden, changed)
    assert torch.equal(before[:, : j + 1], after[:, : j + 1])
    if j + 1 < L:
        assert not torch.equal(before[:, j + 1 :], after[:, j + 1 :])
    else:  # prefix[:, L-1] conditions nothing
        assert torch.equal(before, after)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(0, L))
def test_teacher_forcing_is_bitwise_equal_to_incremental(seed, batch, p):
    """The property `exact` speculative decoding relies on: same prefix -> identical logits, any P and B."""
    head, hidden = make_head(seed), random_hidden(batch, seed + 1)
    prefix = random_prefix(batch, p, seed + 2)
    with torch.no_grad():
        assert torch.equal(head.logits_given_prefix(hidden, prefix), incremental_logits(head, hidden, prefix))


def test_teacher_forcing_bitwise_at_default_sizes():
    head, hidden = RFSQHead(RSDConfig()), random_hidden(3, 0, 4096)
    prefix = torch.randint(0, 7, (3, 8, 8, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        state = head.start(hidden)
        teacher = head.teacher_forced(state, prefix)
        for layer in range(8):
            assert torch.equal(teacher[:, layer], head.step(state)), f"layer {layer}"
            if layer < 7:
                state = head.advance(state, prefix[:, layer])


@pytest.mark.parametrize("batch", [1, 4])
def test_forward_is_greedy_rollout(batch):
    """forward == teacher forcing on its own argmax, and each layer's codes are the argmax fed to the next."""
    head, hidden = make_head(3), random_hidden(batch, 4)
    with torch.no_grad():
        logits = head(hidden)
        codes = logits.argmax(dim=-1)  # [B, L, C, H]
        assert torch.equal(head.logits_given_prefix(hidden, codes), logits)
        assert torch.equal(head.logits_given_prefix(hidden, codes[:, : L - 1]), logits)
        assert torch.equal(incremental_logits(head, hidden, codes), logits)


def test_layers_actually_depend_on_earlier_codes():
    """Greedy layer 1 must change when layer 0 is forced to other codes (the head is truly conditional)."""
    head, hidden = make_head(5), random_hidden(2, 6)
    with torch.no_grad():
        greedy = head(hidden).argmax(dim=-1)
        forced = (greedy[:, :1] + 2) % G
        assert not torch.equal(head.logits_given_prefix(hidden, forced)[:, 1], head(hidden)[:, 1])


def test_gradients_reach_every_part():
    head, hidden = make_head(7), random_hidden(3, 8)
    prefix = random_prefix(3, L, 9)
    logits = head.logits_given_prefix(hidden, prefix)  # [B, L, C, H, G]
    loss = torch.nn.functional.cross_entropy(
        rearrange(logits, "b l c h g -> (b l c h) g"), rearrange(prefix, "b l c h -> (b l c h)")
    )
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # only the rows of layers 0..L-2 that the prefix used receive gradient (layer L-1 conditions nothing)
    grad_rows = head.code_embedding.weight.grad.abs().sum(dim=1) > 0
    assert not grad_rows[(L - 1) * C * H * G :].any()


def test_state_dict_round_trip_is_strict_and_exact():
    head, hidden = make_head(11), random_hidden(2, 12)
    state = head.state_dict()
    assert "code_offsets" not in state  # derived state, not checkpoint state
    clone = RFSQHead(CFG)
    clone.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(clone(hidden), head(hidden))


# errors


@pytest.mark.parametrize(
    "hidden, error, words",
    [
        ([[0.0] * D], DTypeError, "torch.Tensor"),
        (torch.zeros(1, D, dtype=torch.int64), DTypeError, "floating point"),
        (torch.zeros(D), ShapeError, f"D = hidden_dim = {D}"),
        (torch.zeros(2, D + 1), ShapeError, f"D = hidden_dim = {D}"),
        (torch.zeros(0, D), ShapeError, "B >= 1"),
        (torch.zeros(1, D, dtype=torch.float64), DTypeError, "hidden.to(torch.float32)"),
    ],
)
def test_hidden_validation(hidden, error, words):
    """The heads check the hidden state's layout; its values are checked once, before the heads (test_checks_once)."""
    torch.manual_seed(0)
    for head in (RFSQHead(CFG), DraftHead(CFG), L1ActionHead(CFG)):
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
            head(hidden)
    with pytest.raises(error):
        RFSQHead(CFG).logits_given_prefix(hidden, random_prefix(1, 1, 0))


@pytest.mark.parametrize(
    "prefix, error, words",
    [
        (torch.zeros(2, 1, C, H, dtype=torch.int32), DTypeError, "int64"),
        (torch.zeros(2, L + 1, C, H, dtype=torch.int64), ShapeError, f"L = {L}"),
        (torch.zeros(2, 1, C + 1, H, dtype=torch.int64), ShapeError, r"\[B, P, C, H\]"),
        (torch.zeros(3, 1, C, H, dtype=torch.int64), ShapeError, r"\[2, \*, 4, 4\]"),
        (torch.zeros(2, C, H, dtype=torch.int64), ShapeError, r"\[B, P, C, H\]"),
        (torch.full((2, 1, C, H), G, dtype=torch.int64), CodeRangeError, rf"\[0, {G}\)"),
        (torch.full((2, 2, C, H), -1, dtype=torch.int64), CodeRangeError, r"\[-1, -1\]"),
    ],
)
def test_prefix_validation(prefix, error, words):
    with pytest.raises(error, match=words):
        make_head(0).logits_given_prefix(random_hidden(2, 0), prefix)


def test_incremental_api_errors():
    head = make_head(0)
    state = head.start(random_hidden(2, 0))
    codes = random_prefix(2, 1, 0)[:, 0]
    with pytest.raises(ShapeError, match=r"\[B, C, H\]"):
        head.advance(state, codes[:1])
    with pytest.raises(DTypeError, match="int64"):
        head.advance(state, codes.float())
    with pytest.raises(CodeRangeError):
        head.advance(state, codes + G)
    with pytest.raises(ShapeError, match="state before layer 0"):
        head.teacher_forced(head.advance(state, codes), random_prefix(2, 1, 0))
    with pytest.raises(DTypeError, match="HeadState"):
        head.step(state.base)
    for _ in range(L):
        state = head.advance(state, codes)
    with pytest.raises(ShapeError, match=f"layer {L}"):
        head.step(state)


# the one greedy rollout


@pytest.mark.parametrize("batch", [1, 3])
def test_rollout_is_greedy_and_forward_returns_its_logits(batch):
    head, hidden = make_head(13), random_hidden(batch, 14)
    with torch.no_grad():
        codes, logits = head.rollout(head.start(hidden))
        assert codes.shape == (batch, L, C, H) and codes.dtype == torch.int64 and logits.shape == (batch, L, C, H, G)
        assert torch.equal(codes, logits.argmax(dim=-1))
        assert torch.equal(logits, head(hidden))
        assert torch.equal(logits, incremental_logits(head, hidden, codes))  # each layer saw the codes below it


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 4), st.integers(0, L), st.data())
def test_rollout_keeps_the_prefix_and_continues_greedily(seed, batch, p, data):
    """Element b keeps prefix[b, :prefix_layers[b]], then greedy: the reference steps one layer at a time."""
    head, hidden = make_head(seed), random_hidden(batch, seed + 1)
    prefix = random_prefix(batch, p, seed + 2)
    kept = torch.tensor(data.draw(st.lists(st.integers(0, p), min_size=batch, max_size=batch)))
    with torch.no_grad():
        state, expected = head.start(hidden), []
        for layer in range(L):
            greedy = head.step(state).argmax(dim=-1)
            forced = prefix[:, layer] if layer < p else greedy
            expected.append(torch.where((kept > layer)[:, None, None], forced, greedy))
            if layer + 1 < L:
                state = head.advance(state, expected[-1])
        expected = torch.stack(expected, dim=1)
        assert torch.equal(head.rollout(head.start(hidden), prefix, kept)[0], expected)
        everywhere = torch.full((batch,), p)
        assert torch.equal(head.rollout(head.start(hidden), prefix)[0], head.rollout(head.start(hidden), prefix, everywhere)[0])


@pytest.mark.parametrize("s", [1, L - 1])
def test_rollout_from_a_later_state_equals_the_rollout_from_the_start(s):
    """Advancing through prefix[:, :s] then rolling out == rolling out with that prefix (the speculative path)."""
    head, hidden = make_head(15), random_hidden(2, 16)
    prefix = random_prefix(2, L, 17)
    with torch.no_grad():
        state = head.start(hidden)
        for layer in range(s):
            state = head.advance(state, prefix[:, layer], validate=False)
        kept = torch.tensor([s, L])
        codes, logits = head.rollout(state, prefix, kept)
        full_codes, full_logits = head.rollout(head.start(hidden), prefix, kept)
    assert torch.equal(codes, full_codes) and torch.equal(logits, full_logits[:, s:])


def test_teacher_forced_states_are_the_incremental_states():
    head, hidden = make_head(18), random_hidden(3, 19)
    prefix = random_prefix(3, 2, 20)
    with torch.no_grad():
        logits, states = head.teacher_forced(head.start(hidden), prefix, return_states=True)
        assert torch.equal(logits, head.teacher_forced(head.start(hidden), prefix, validate=False))
        state = head.start(hidden)
        for layer, got in enumerate(states):
            assert got.layer == layer and torch.equal(got.context, state.context) and got.base is states[0].base
            if layer < prefix.shape[1]:
                state = head.advance(state, prefix[:, layer])


def test_rollout_errors():
    head = make_head(0)
    state = head.start(random_hidden(2, 0))
    prefix = random_prefix(2, 2, 0)
    later = head.advance(state, prefix[:, 0])
    with pytest.raises(ShapeError, match="pass the `prefix`"):
        head.rollout(later)
    with pytest.raises(ShapeError, match="pass `prefix`"):
        head.rollout(state, prefix_layers=torch.tensor([1, 1]))
    with pytest.raises(ShapeError, match="1 <= P"):
        head.rollout(later, prefix[:, :0])
    with pytest.raises(CodeRangeError, match=r"\[0, P = 2\]"):
        head.rollout(state, prefix, torch.tensor([0, 3]))
    with pytest.raises(DTypeError, match="int64"):
        head.rollout(state, prefix, torch.tensor([0.0, 1.0]))
    with pytest.raises(ShapeError, match=r"\[B\] = \[2\]"):
        head.rollout(state, prefix, torch.tensor([1]))
    with pytest.raises(CodeRangeError):
        head.rollout(state, prefix + G)
    for _ in range(L - 1):
        later = head.advance(later, prefix[:, 0])
    with pytest.raises(ShapeError, match=f"layer {L}"):
        head.rollout(later, random_prefix(2, L, 1))

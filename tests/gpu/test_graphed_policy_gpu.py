"""RSDPolicy(graphed=True) returns the actions of the eager greedy RSDPolicy on the same weights, and the
graphed decoder (rsd.fastpath.GraphedRSDDecoder) validates in the graph: one host sync per call,
NaN hidden / NaN actions / wrong dtype / wrong shape all raise."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from rsd.config import RSDConfig
from rsd.errors import DTypeError, NonFiniteError, ShapeError
from rsd.fastpath import GraphedRSDDecoder, argmax_regret
from rsd.heads import RFSQHead
from rsd.speculative import greedy_decode
from rsd.tokenizer import RFSQTokenizer

pytestmark = pytest.mark.gpu

INSTRUCTIONS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
                "open the top drawer and put the bowl inside", "turn on the stove"]


def _parts(cfg: RSDConfig, device: torch.device, seed: int = 1) -> tuple[RFSQHead, RFSQTokenizer]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head, tok = RFSQHead(cfg), RFSQTokenizer.from_config(cfg)
    return head.to(device).eval(), tok.to(device).eval()


@pytest.mark.parametrize("sizes", ["tiny", "default_heads"])
def test_graphed_policy_equals_eager_greedy_policy(cuda, sizes: str) -> None:
    from rsd.backbones.tiny import TinyBackbone
    from rsd.normalize import NormStats
    from rsd.policy import RSDPolicy

    cfg = RSDConfig.tiny() if sizes == "tiny" else RSDConfig(hidden_dim=32)  # default C, H, L, G, W over a tiny backbone
    backbone = TinyBackbone(hidden_dim=cfg.hidden_dim, image_size=32, seed=0).to(cuda).eval()
    head, tok = _parts(cfg, cuda)
    stats = NormStats(q01=[-0.5] * 6 + [0.0], q99=[0.5] * 7, mask=[True] * 6 + [False])
    eager = RSDPolicy(backbone, head, tok, stats, config=cfg, device=cuda)
    graphed = RSDPolicy(backbone, head, tok, stats, config=cfg, device=cuda, graphed=True)
    seen = []
    for seed in range(6):
        obs, text = backbone.observation_spec.fake(seed), INSTRUCTIONS[seed % len(INSTRUCTIONS)]
        want, got = eager.predict_chunk(obs, text), graphed.predict_chunk(obs, text)
        assert got.info["graphed"] and not want.info["graphed"]
        assert np.array_equal(got.actions, want.actions), np.abs(got.actions - want.actions).max()
        assert got.info["code_histogram"] == want.info["code_histogram"]
        seen.append(got.actions)
    # the comparison means something only if the chunks depend on the observation
    assert len({a.tobytes() for a in seen}) > 1
    assert graphed._graphed._graph.num_graphs == 1  # batch 1: one graph, replayed


def test_graphed_decoder_syncs_the_host_once(cuda) -> None:
    cfg = RSDConfig()
    head, tok = _parts(cfg, cuda)
    decoder = GraphedRSDDecoder(head, tok, device=cuda)
    hidden = torch.randn(1, cfg.hidden_dim, device=cuda, generator=torch.Generator(cuda).manual_seed(3))
    decoder.decode(hidden)  # capture
    torch.cuda.synchronize()
    (codes, actions), syncs = _flagged_syncs(lambda: decoder.decode(hidden))
    assert len(syncs) == 1, syncs  # the flags' read-back; RFSQHead.start's finite check no longer syncs
    assert torch.equal(codes, greedy_decode(head, hidden))
    assert torch.equal(actions, tok.decode_from_indices(codes))
    # decode_to_host: the packed output copied to pinned memory behind the replay, then one stream sync
    # (torch's sync debug mode may or may not flag an explicit stream sync: at most that one)
    decoder.decode_to_host(hidden)
    (codes_host, actions_host), syncs = _flagged_syncs(lambda: decoder.decode_to_host(hidden))
    assert len(syncs) <= 1, syncs
    assert codes_host.device.type == "cpu" and torch.equal(codes_host, codes.cpu())
    assert torch.equal(actions_host, actions.cpu())


def _flagged_syncs(fn):
    """-> (fn(), the host syncs torch's sync debug mode warned about during the call)."""
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return result, [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


def test_graphed_decoder_raises_on_bad_inputs_and_outputs(cuda) -> None:
    cfg = RSDConfig()
    head, tok = _parts(cfg, cuda)
    decoder = GraphedRSDDecoder(head, tok, device=cuda)
    gen = torch.Generator(cuda).manual_seed(4)
    hidden = torch.randn(2, cfg.hidden_dim, device=cuda, generator=gen)
    expected = greedy_decode(head, hidden)
    bad = hidden.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(NonFiniteError, match="hidden"):
        decoder.decode(bad)
    with pytest.raises(DTypeError, match="float32"):
        decoder.decode(hidden.bfloat16())
    with pytest.raises(ShapeError, match="hidden_dim"):
        decoder.decode(hidden[:, :-1])
    codes, actions = decoder.decode(hidden)  # the same graph, still right after the failures
    assert torch.equal(codes, expected) and torch.equal(actions, tok.decode_from_indices(expected))

    broken = copy.deepcopy(tok)
    with torch.no_grad():
        for param in broken.decoder.parameters():
            param.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="actions"):
        GraphedRSDDecoder(head, broken, device=cuda).decode(hidden)


def test_compiled_decoder_codes_are_eager_argmax_up_to_ties(cuda) -> None:
    """compile=True (inductor-fused steps): every code is eager's argmax given its own prefix, up to a
    rounding tie (argmax_regret <= 1e-4 on logits of order 1), over 256 random hidden states; actions
    are decoded from its own codes; to_host gives the same; the flags still raise."""
    cfg = RSDConfig()
    head, tok = _parts(cfg, cuda, seed=2)
    decoder = GraphedRSDDecoder(head, tok, device=cuda, compile=True)
    hidden = torch.randn(256, cfg.hidden_dim, device=cuda, generator=torch.Generator(cuda).manual_seed(6))
    codes, actions = decoder.decode(hidden)
    regret = argmax_regret(head, hidden, codes)
    assert float(regret.max()) <= 1e-4, regret.max()
    assert float(argmax_regret(head, hidden, greedy_decode(head, hidden)).max()) == 0.0  # the criterion is exact
    assert (codes == greedy_decode(head, hidden)).double().mean() > 0.99
    torch.testing.assert_close(actions, tok.decode_from_indices(codes), rtol=1e-5, atol=1e-6)
    codes_host, actions_host = decoder.decode_to_host(hidden)
    assert codes_host.device.type == "cpu" and torch.equal(codes_host, codes.cpu())
    assert torch.equal(actions_host, actions.cpu())
    bad = hidden.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="hidden"):
        decoder.decode_to_host(bad)


def test_argmax_regret_sees_a_wrong_code(cuda) -> None:
    """The criterion can fail: flipping one code of eager greedy decoding gives a positive regret."""
    cfg = RSDConfig()
    head, _ = _parts(cfg, cuda, seed=3)
    hidden = torch.randn(2, cfg.hidden_dim, device=cuda, generator=torch.Generator(cuda).manual_seed(7))
    codes = greedy_decode(head, hidden).clone()  # a normal tensor (greedy_decode may return an inference tensor)
    codes[1, 0, 0, 0] = (codes[1, 0, 0, 0] + 1) % cfg.num_levels
    regret = argmax_regret(head, hidden, codes)
    assert float(regret[0]) == 0.0 and float(regret[1]) > 1e-3


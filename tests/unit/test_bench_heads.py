"""Latency of the heads at DEFAULT sizes (D=4096, W=512, C=8, H=16, L=8, G=7, k=3), batch 1, CPU.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_bench_heads.py --benchmark-only -q``.
The lead's target for (a) is <= 1 ms on the 2-core dev box; it is reported, not asserted (machines vary).

(a) main head greedy + argmax + layout + RFSQ decode -> actions [1, C, A]
(b) speculative decoding with a draft that agrees fully (its real network runs; its output bias is set to
    the main head's greedy codes), codes only
(c) main-only greedy decoding, codes only
(d) speculative decoding with a random draft (rejected at layer 0: the worst case), codes only
"""

import pytest
import torch
from einops import rearrange

from rsd.config import RSDConfig
from rsd.heads import DraftHead, RFSQHead
from rsd.speculative import SpeculativeDecoder, greedy_decode
from rsd.tokenizer import RFSQTokenizer

pytestmark = [pytest.mark.unit, pytest.mark.benchmark]

CFG = RSDConfig()
# Short runs (hundreds of rounds each) so the file also fits in the unit set's time budget.
BENCH = pytest.mark.benchmark(group="heads-default-b1", max_time=0.5, warmup=True)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    main, draft, tokenizer = RFSQHead(CFG).eval(), DraftHead(CFG).eval(), RFSQTokenizer.from_config(CFG).eval()
    hidden = torch.randn(1, CFG.hidden_dim, generator=torch.Generator().manual_seed(1))
    greedy = greedy_decode(main, hidden)  # [1, C, H, L]
    agreeing = DraftHead(CFG).eval()
    with torch.no_grad():  # same network and cost; argmax = the main head's greedy layers 0..k-1 for any input
        first_k = greedy[..., : CFG.draft_layers]  # [1, C, H, k]
        target = torch.nn.functional.one_hot(first_k, CFG.num_levels).float() * 10.0  # [1, C, H, k, G]
        agreeing.net[-1].weight.zero_()
        agreeing.net[-1].bias.copy_(rearrange(target, "1 c h k g -> (k c h g)"))  # the draft's output order
    return dict(main=main, draft=draft, agreeing=agreeing, tokenizer=tokenizer, hidden=hidden, greedy=greedy)


@BENCH
def test_bench_a_greedy_head_layout_decode(benchmark, setup):
    main, tokenizer, hidden = setup["main"], setup["tokenizer"], setup["hidden"]

    def run():
        with torch.inference_mode():
            return tokenizer.decode_from_indices(greedy_decode(main, hidden))

    actions = benchmark(run)
    assert actions.shape == (1, CFG.chunk_len, CFG.action_dim) and torch.isfinite(actions).all()
    with torch.inference_mode():
        assert torch.equal(actions, tokenizer.decode_from_indices(setup["greedy"]))


@BENCH
def test_bench_b_speculative_full_accept(benchmark, setup):
    decoder = SpeculativeDecoder(setup["agreeing"], setup["main"])
    codes, stats = benchmark(decoder.decode, setup["hidden"])
    assert torch.equal(codes, setup["greedy"])
    assert stats.accepted_layers == (CFG.draft_layers,)
    assert stats.main_steps == CFG.num_layers - CFG.draft_layers


@BENCH
def test_bench_c_greedy_main_only(benchmark, setup):
    codes = benchmark(greedy_decode, setup["main"], setup["hidden"])
    assert torch.equal(codes, setup["greedy"])


@BENCH
def test_bench_d_speculative_rejected(benchmark, setup):
    decoder = SpeculativeDecoder(setup["draft"], setup["main"])
    codes, stats = benchmark(decoder.decode, setup["hidden"])
    assert torch.equal(codes, setup["greedy"])
    assert stats.accepted_layers == (0,) and stats.main_steps == CFG.num_layers

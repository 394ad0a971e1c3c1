"""Latency benchmarks on the GPU (pytest-benchmark; each timed call ends with torch.cuda.synchronize()),
batch 1, the OpenVLA-7B-shaped backbone (random weights, bf16): vision towers, LLM forward, heads,
decode, full predict_chunk; eager and CUDA-graph fast path. ``rsd.gpu_bench`` writes the same breakdown
with CUDA events and floors to results/gpu/. Each benchmark also checks what the timed call returned."""

from __future__ import annotations

import copy
import statistics

import numpy as np
import pytest
import torch

from rsd.backbones.openvla_inputs import observation_spec
from rsd.fastpath import CudaGraphFn, GraphedRSDDecoder, argmax_regret
from rsd.gpu_bench import LIBERO_INSTRUCTION, time_cuda
from rsd.speculative import SpeculativeDecoder, greedy_decode

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark]
ROUNDS, WARMUP = 20, 3


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _bench(benchmark, fn):
    return benchmark.pedantic(_synced(fn), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.fixture(scope="module")
def inputs(shaped_7b):
    obs = observation_spec(shaped_7b.shape).fake(0)
    (images, ids, proprio, _), = shaped_7b.inputs(obs, LIBERO_INSTRUCTION)
    model = shaped_7b.model
    with torch.inference_mode():
        sequence = model.prompt_sequence(model.vision_embeds(images, proprio), ids)
    return obs, images, ids, proprio, sequence


@pytest.fixture(scope="module")
def rsd_gpu(rsd_parts_cpu, cuda):
    cfg, head, draft, tok = rsd_parts_cpu
    return cfg, copy.deepcopy(head).to(cuda), copy.deepcopy(draft).to(cuda), copy.deepcopy(tok).to(cuda)


@pytest.mark.benchmark(group="vision")
@pytest.mark.parametrize("variant", ["eager", "fast"])
def test_vision_towers(benchmark, shaped_7b, shaped_7b_fast, inputs, variant: str) -> None:
    _, images, _, proprio, _ = inputs
    fn = shaped_7b.model.vision_embeds if variant == "eager" else CudaGraphFn(shaped_7b_fast.model.vision_embeds)
    with torch.inference_mode():
        out = _bench(benchmark, lambda: fn(images, proprio))
    assert out.shape == (1, 2 * 256 + 1, 4096) and torch.isfinite(out).all()


@pytest.mark.benchmark(group="llm")
@pytest.mark.parametrize("variant", ["eager", "fast"])
def test_llm_forward(benchmark, shaped_7b, shaped_7b_fast, inputs, variant: str) -> None:
    sequence = inputs[-1]
    fn = shaped_7b.model.llm_last_hidden if variant == "eager" else CudaGraphFn(shaped_7b_fast.model.llm_last_hidden)
    with torch.inference_mode():
        out = _bench(benchmark, lambda: fn(sequence))
    assert out.shape == (1, 4096) and torch.isfinite(out).all()


@pytest.mark.benchmark(group="heads")
def test_heads_logits(benchmark, rsd_gpu) -> None:
    cfg, head, draft, _ = rsd_gpu
    hidden = torch.randn(1, cfg.hidden_dim, device="cuda")
    with torch.inference_mode():
        out = _bench(benchmark, lambda: (draft(hidden), head(hidden)))
    assert out[1].shape == (1, cfg.num_layers, cfg.chunk_len, cfg.latent_dim, cfg.num_levels)


@pytest.mark.benchmark(group="decode")
@pytest.mark.parametrize("variant", ["greedy", "speculative", "graphed", "graphed_to_host", "graphed_compiled_to_host"])
def test_decode(benchmark, rsd_gpu, variant: str) -> None:
    """Heads + argmax + layout + decode; the graphed variants to the host are what RSDPolicy(graphed=True)
    runs (the compiled one with compile_heads=True)."""
    cfg, head, draft, tok = rsd_gpu
    hidden = torch.randn(1, cfg.hidden_dim, device="cuda")
    if variant == "greedy":
        fn = lambda: tok.decode_from_indices(greedy_decode(head, hidden))  # noqa: E731
    elif variant == "speculative":
        spec = SpeculativeDecoder(draft, head, mode="exact")
        fn = lambda: tok.decode_from_indices(spec.decode(hidden)[0])  # noqa: E731
    elif variant == "graphed":
        graphed = GraphedRSDDecoder(head, tok)
        fn = lambda: graphed.decode(hidden)[1]  # noqa: E731
    else:
        graphed = GraphedRSDDecoder(head, tok, compile=variant == "graphed_compiled_to_host")
        fn = lambda: graphed.decode_to_host(hidden)[1]  # noqa: E731
    with torch.inference_mode():
        actions = _bench(benchmark, fn)
        expected = tok.decode_from_indices(greedy_decode(head, hidden))
    if variant == "graphed_compiled_to_host":  # equal up to a float-rounding tie (rsd.fastpath.argmax_regret)
        codes = graphed.decode_to_host(hidden)[0].cuda()
        assert float(argmax_regret(head, hidden, codes).max()) <= 1e-4
        torch.testing.assert_close(actions.cuda(), tok.decode_from_indices(codes), rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(actions.to(expected.device), expected, rtol=0, atol=0)


@pytest.mark.benchmark(group="predict_chunk")
@pytest.mark.parametrize("variant", ["eager", "fast"])
def test_predict_chunk(benchmark, shaped_7b, shaped_7b_fast, inputs, rsd_gpu, variant: str) -> None:
    from rsd.normalize import NormStats
    from rsd.policy import RSDPolicy

    cfg, head, draft, tok = rsd_gpu
    stats = NormStats(q01=[-1.0] * 6 + [0.0], q99=[1.0] * 7, mask=[True] * 6 + [False])
    backbone = shaped_7b if variant == "eager" else shaped_7b_fast
    policy = RSDPolicy(backbone, head, tok, stats, config=cfg, draft=draft, speculative=True, device="cuda")
    chunk = _bench(benchmark, lambda: policy.predict_chunk(inputs[0], LIBERO_INSTRUCTION))
    assert chunk.actions.shape == (8, 7) and np.isfinite(chunk.actions).all()


def test_fast_path_is_not_slower(shaped_7b, shaped_7b_fast, inputs) -> None:
    """Median of 20 CUDA-event timings after warm-up: the fast path must not lose to eager."""
    _, images, ids, proprio, _ = inputs
    with torch.inference_mode():
        eager = statistics.median(time_cuda(lambda: shaped_7b.model.rsd_hidden(images, ids, proprio), warmup=3, iters=20))
        fast = statistics.median(time_cuda(lambda: shaped_7b_fast._graphed(images, ids, proprio), warmup=3, iters=20))
    assert fast <= eager, (fast, eager)


def test_gpu_bench_runs_end_to_end_at_tiny_size(cuda) -> None:
    """rsd.gpu_bench.run_breakdown (what `rsd bench --backbone openvla-shaped --device cuda` and the
    committed results/gpu JSONs come from) on the tiny OpenVLA shape: every variant, parity and goal key."""
    from rsd.gpu_bench import format_breakdown, run_breakdown

    result = run_breakdown(size="tiny", iters=3, warmup=1, num_images=1, ceilings=False, fp32_reference=False,
                           regret_samples=32)
    assert "fast_compiled_error" not in result, result.get("fast_compiled_error")
    assert {"eager", "graph", "optimized_eager", "fast", "fast_compiled"} <= set(result["timings_ms"])
    compiled = result["timings_ms"]["fast_compiled"]
    for key in ("rsd_decode_plain_to_host", "rsd_decode_compiled_to_host", "predict_chunk_graphed_compiled"):
        assert compiled[key]["p50"] > 0, key
    assert result["parity"]["compiled_decode_regret"]["max"] <= 1e-4
    assert result["policy_parity"]["fast_compiled"]["predict_chunk_graphed_actions_equal_greedy"]
    assert "predict_chunk_graphed_compiled" in format_breakdown(result)

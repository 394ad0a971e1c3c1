"""CUDA vs CPU: tokenizer, heads, layout, speculative decoding and the OpenVLA architecture compute the
same things on the GPU (float32 tight; bf16 looser; codes equal wherever the logits' margin allows)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rsd.layout import canonical_to_flat, codes_to_layers, flat_to_canonical, layers_to_codes, logits_to_codes
from rsd.speculative import SpeculativeDecoder, greedy_decode

pytestmark = pytest.mark.gpu

MARGIN = 1e-3  # a top-1/top-2 logit gap above this cannot flip between float32 CPU and GPU arithmetic


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def _margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@pytest.fixture(scope="module")
def hidden_cpu(rsd_parts_cpu) -> torch.Tensor:
    cfg = rsd_parts_cpu[0]
    return torch.randn(4, cfg.hidden_dim, generator=torch.Generator().manual_seed(1))


def test_tokenizer_round_trip_on_cuda_matches_cpu(rsd_parts_cpu, cuda) -> None:
    cfg, _, _, tok = rsd_parts_cpu
    tok_gpu = copy.deepcopy(tok).to(cuda)
    actions = torch.rand(16, cfg.chunk_len, cfg.action_dim, generator=torch.Generator().manual_seed(2)) * 2 - 1
    codes_cpu, codes_gpu = tok.encode(actions), tok_gpu.encode(actions.to(cuda)).cpu()
    assert codes_gpu.dtype == torch.int64
    # coarse layers agree (only float near-ties may round differently); the deepest layers resolve residuals
    # near float32 resolution (scale (G-1)^-7 ~ 3.6e-6), so they may differ: compare what the codes decode to
    assert (codes_cpu[..., :4] != codes_gpu[..., :4]).float().mean() < 1e-3
    latent_cpu, latent_gpu = tok.codes_to_latent(codes_cpu), tok.codes_to_latent(codes_gpu)
    torch.testing.assert_close(latent_gpu, latent_cpu, rtol=0, atol=2e-6)
    decoded_cpu = tok.decode_from_indices(codes_cpu)
    decoded_gpu = tok_gpu.decode_from_indices(codes_cpu.to(cuda)).cpu()
    torch.testing.assert_close(decoded_gpu, decoded_cpu, rtol=1e-5, atol=1e-6)
    # the exactness contract holds on the GPU too: decode(encode(x)) == forward(x)
    recon, codes = tok_gpu(actions.to(cuda))
    assert torch.equal(tok_gpu.decode_from_indices(codes), recon)


def test_heads_float32_and_bf16_on_cuda(rsd_parts_cpu, hidden_cpu, cuda) -> None:
    cfg, head, draft, _ = rsd_parts_cpu
    prefix = torch.randint(0, cfg.num_levels, (4, cfg.num_layers, cfg.chunk_len, cfg.latent_dim),
                           generator=torch.Generator().manual_seed(3))
    ref = head.logits_given_prefix(hidden_cpu, prefix)
    head_gpu = copy.deepcopy(head).to(cuda)
    got = head_gpu.logits_given_prefix(hidden_cpu.to(cuda), prefix.to(cuda)).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    draft_ref = draft(hidden_cpu)
    torch.testing.assert_close(copy.deepcopy(draft).to(cuda)(hidden_cpu.to(cuda)).cpu(), draft_ref, rtol=1e-4, atol=1e-5)
    # bf16 weights and hidden state: looser, against the float32 reference
    head_bf16 = copy.deepcopy(head).to(cuda, torch.bfloat16)
    got16 = head_bf16.logits_given_prefix(hidden_cpu.to(cuda, torch.bfloat16), prefix.to(cuda)).float().cpu()
    assert _rel(got16, ref) < 3e-2
    # codes agree wherever the reference's margin is clear of float32 rounding
    clear = _margin(ref) > MARGIN
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_layout_is_exact_on_cuda(rsd_parts_cpu, cuda) -> None:
    cfg = rsd_parts_cpu[0]
    logits = torch.randn(3, cfg.num_layers, cfg.chunk_len, cfg.latent_dim, cfg.num_levels)
    assert torch.equal(logits_to_codes(logits.to(cuda)).cpu(), logits_to_codes(logits))
    flat = canonical_to_flat(logits.to(cuda))
    assert torch.equal(flat_to_canonical(flat, cfg.chunk_len, cfg.latent_dim).cpu(), logits)
    layers = logits.argmax(-1)
    assert torch.equal(layers_to_codes(layers.to(cuda)).cpu(), layers_to_codes(layers))


def test_greedy_and_speculative_decoding_on_cuda(rsd_parts_cpu, hidden_cpu, cuda) -> None:
    cfg, head, draft, _ = rsd_parts_cpu
    head_gpu, draft_gpu = copy.deepcopy(head).to(cuda), copy.deepcopy(draft).to(cuda)
    hidden = hidden_cpu.to(cuda)
    greedy_gpu = greedy_decode(head_gpu, hidden)
    # exact speculative decoding == greedy, bit for bit, on the GPU as on the CPU
    for mode, threshold in (("exact", None),):
        codes, stats = SpeculativeDecoder(draft_gpu, head_gpu, mode=mode, threshold=threshold).decode(hidden)
        assert torch.equal(codes, greedy_gpu), stats
    # accept-everything relaxed mode still runs the bonus layer and the rollout on the GPU
    relaxed, stats = SpeculativeDecoder(draft_gpu, head_gpu, mode="relaxed", threshold=cfg.num_levels - 1).decode(hidden)
    assert stats.accepted_layers == (cfg.draft_layers,) * 4 and relaxed.shape == greedy_gpu.shape
    # CPU vs GPU greedy codes: teacher-force the CPU codes on the GPU; equal wherever the margin is clear
    greedy_cpu = greedy_decode(head, hidden_cpu)
    prefix = codes_to_layers(greedy_cpu)  # [B, L, C, H]
    ref = head.logits_given_prefix(hidden_cpu, prefix)
    got = head_gpu.logits_given_prefix(hidden, prefix.to(cuda)).cpu()
    clear = _margin(ref) > MARGIN
    assert torch.equal(got.argmax(-1)[clear], prefix[clear])
    if bool(clear.all()):
        assert torch.equal(greedy_gpu.cpu(), greedy_cpu)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_openvla_architecture_cuda_vs_cpu(cuda, dtype: torch.dtype, tol: float) -> None:
    from rsd.backbones.openvla_arch import OpenVLAShape
    from rsd.backbones.openvla_shaped import random_openvla_model, stand_in_token_ids

    shape = OpenVLAShape.tiny()
    cpu_model = random_openvla_model(shape, device="cpu", dtype=torch.float32, seed=3)
    gpu_model = copy.deepcopy(cpu_model).to(cuda, dtype)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 2, 28, 28, 3), dtype=np.uint8))
    ids = torch.tensor([stand_in_token_ids("In: What action should the robot take to open it?\nOut:", 300)] * 2)
    proprio = torch.from_numpy(rng.uniform(-1, 1, (2, 8)).astype(np.float32))
    with torch.inference_mode():
        ref = cpu_model.rsd_hidden(images, ids, proprio)
        got = gpu_model.rsd_hidden(images.to(cuda), ids.to(cuda), proprio.to(cuda)).float()
        assert _rel(got, ref) < tol
        ref_l1 = cpu_model.l1_actions(images, ids, proprio, stop_id=2)
        got_l1 = gpu_model.l1_actions(images.to(cuda), ids.to(cuda), proprio.to(cuda), stop_id=2).float()
        assert _rel(got_l1, ref_l1) < tol

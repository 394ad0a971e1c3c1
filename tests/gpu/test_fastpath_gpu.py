"""The CUDA-graph fast path computes what eager computes: the 7B-shaped backbone (bf16), the tiny
OpenVLA-OFT checkpoint (RSD hidden and L1 actions), and the graphed heads + argmax + layout + decode."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rsd.backbones.openvla_inputs import observation_spec
from rsd.fastpath import CudaGraphFn, GraphedRSDDecoder
from rsd.speculative import greedy_decode

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_fast_backbone_matches_eager_7b(shaped_7b, shaped_7b_fast) -> None:
    """Fast path (optimize_for_inference + CUDA graphs) vs the plain eager module, same weights."""
    texts = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
             "open the top drawer and put the bowl inside"]
    for seed, text in enumerate(texts + texts[1:]):
        obs = observation_spec(shaped_7b.shape).fake(seed)
        eager, fast = shaped_7b.encode(obs, text), shaped_7b_fast.encode(obs, text)
        assert fast.shape == (1, 4096) and fast.dtype == torch.float32 and torch.isfinite(fast).all()
        assert _rel(fast, eager) < 1e-2, _rel(fast, eager)  # bf16 tolerance
    assert shaped_7b_fast._graphed.num_graphs == 2  # one graph per prompt length; the third call replayed one
    # the graphs of the plain module alone reproduce eager (same kernels)
    graphed = CudaGraphFn(shaped_7b.model.rsd_hidden, device="cuda")
    (images, ids, proprio, _), = shaped_7b.inputs(observation_spec(shaped_7b.shape).fake(9), texts[0])
    with torch.inference_mode():
        assert _rel(graphed(images, ids, proprio), shaped_7b.model.rsd_hidden(images, ids, proprio)) < 1e-3


def test_fast_encode_matches_eager_on_tiny_checkpoint(tmp_path, cuda) -> None:
    from rsd.backbones.openvla import OpenVLAOFTBackbone
    from tests._openvla_tiny import INSTRUCTIONS, build_tiny_oft_checkpoint, tiny_observation

    ckpt = build_tiny_oft_checkpoint(tmp_path / "openvla-7b-oft-finetuned-libero-spatial")
    backbone = OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_spatial", device=cuda, dtype="bfloat16")
    obs = tiny_observation(0)
    eager_h, eager_a = backbone.encode(obs, INSTRUCTIONS[0]), backbone.predict_actions(obs, INSTRUCTIONS[0])
    backbone.set_fast(True)
    fast_h, fast_a = backbone.encode(obs, INSTRUCTIONS[0]), backbone.predict_actions(obs, INSTRUCTIONS[0])
    assert _rel(fast_h, eager_h) < 1e-2 and _rel(fast_a, eager_a) < 1e-2
    cpu = OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_spatial", device="cpu", dtype="float32")
    assert _rel(fast_h.cpu(), cpu.encode(obs, INSTRUCTIONS[0])) < 5e-2  # bf16 GPU vs float32 CPU


def test_graphed_rsd_decoder_matches_eager(rsd_parts_cpu, cuda) -> None:
    cfg, head, _, tok = rsd_parts_cpu
    head, tok = copy.deepcopy(head).to(cuda), copy.deepcopy(tok).to(cuda)
    decoder = GraphedRSDDecoder(head, tok, device=cuda)
    for seed in range(3):
        hidden = torch.randn(1, cfg.hidden_dim, device=cuda, generator=torch.Generator(cuda).manual_seed(seed))
        codes, actions = decoder.decode(hidden)
        expected = greedy_decode(head, hidden)
        assert torch.equal(codes, expected)
        torch.testing.assert_close(actions, tok.decode_from_indices(expected), rtol=0, atol=0)


def test_cuda_graph_fn_rejects_cpu_tensors(cuda) -> None:
    from rsd.errors import ShapeError

    graphed = CudaGraphFn(lambda x: x * 2, device=cuda)
    with pytest.raises(ShapeError, match="CUDA tensors"):
        graphed(torch.ones(3))
    torch.testing.assert_close(graphed(torch.ones(3, device=cuda)), torch.full((3,), 2.0, device=cuda))


def test_compiled_fast_path_is_as_accurate_as_eager(cuda) -> None:
    """set_fast(True, compile=True)-style model (torch.compile'd layers/blocks in CUDA graphs) at the 7B
    widths with 4 decoder layers: its bf16 error against the same weights in float32 stays at eager's."""
    from dataclasses import replace

    from rsd.backbones.openvla_arch import OpenVLAShape
    from rsd.backbones.openvla_shaped import random_openvla_model

    shape = OpenVLAShape.openvla_7b()
    shape = replace(shape, llm=replace(shape.llm, num_layers=4))
    model = random_openvla_model(shape, device=cuda, dtype=torch.bfloat16, seed=1)
    reference = copy.deepcopy(model).float()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (1, 2, 224, 224, 3), dtype=np.uint8)).to(cuda)
    ids = torch.from_numpy(rng.integers(3, 32000, (1, 32))).to(cuda)
    ids[0, 0] = 1
    proprio = torch.from_numpy(rng.uniform(-1, 1, (1, 8)).astype(np.float32)).to(cuda)
    with torch.inference_mode():
        exact = reference.rsd_hidden(images, ids, proprio)
        eager = model.rsd_hidden(images, ids, proprio)
        model.optimize_for_inference(compile=True)
        fast = CudaGraphFn(model.rsd_hidden, device=cuda)(images, ids, proprio)
    err_eager, err_fast = _rel(eager.float(), exact), _rel(fast.float(), exact)
    assert err_fast <= 1.5 * err_eager + 1e-3, (err_fast, err_eager)
    assert _rel(fast, eager) < 2e-2


def test_compiled_graphed_decoder_matches_eager(rsd_parts_cpu, cuda) -> None:
    cfg, head, _, tok = rsd_parts_cpu
    head, tok = copy.deepcopy(head).to(cuda), copy.deepcopy(tok).to(cuda)
    decoder = GraphedRSDDecoder(head, tok, device=cuda, compile=True)
    hidden = torch.randn(2, cfg.hidden_dim, device=cuda, generator=torch.Generator(cuda).manual_seed(5))
    codes, actions = decoder.decode(hidden)
    expected = greedy_decode(head, hidden)
    assert (codes == expected).float().mean() > 0.999  # fused rounding may flip an exact-tie argmax, nothing more
    torch.testing.assert_close(actions, tok.decode_from_indices(codes), rtol=1e-5, atol=1e-6)

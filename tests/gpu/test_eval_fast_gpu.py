"""``make_policy(..., fast=True)`` (``rsd eval --fast``) on a GPU: a saved greedy RSD policy comes back graphed
and compiled and acts as the eager one does (codes = eager argmax up to float-rounding ties); a speculative RSD
policy keeps its speculative decoder while its OpenVLA-OFT backbone goes on the compiled fast path; the
``openvla-oft:`` pipeline gets a compiled backbone whose actions match eager within bf16 tolerance; a policy
with nothing on a fast path is refused.

Run on a GPU machine: ``pytest tests/gpu/test_eval_fast_gpu.py`` (the compiles take tens of seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rsd.errors import ConfigError
from rsd.fastpath import argmax_regret
from rsd.policy.factory import make_policy
from rsd.policy import L1Policy, RSDPolicy
from rsd.speculative import greedy_decode
from tests.policy_factory import fake_observation, tiny_l1_policy, tiny_rsd_policy

pytestmark = pytest.mark.gpu

INSTRUCTIONS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
                "open the top drawer and put the bowl inside", "turn on the stove"]
TIE = 1e-4  # argmax_regret bound of the compiled decoder (tests/gpu/test_graphed_policy_gpu.py): logits of order 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def test_fast_greedy_rsd_policy_is_graphed_compiled_and_acts_like_eager(tmp_path: Path, cuda) -> None:
    directory = tiny_rsd_policy(speculative=False, seed=3).save_pretrained(tmp_path / "greedy")
    eager = make_policy(str(directory), device="cuda")
    fast = make_policy(str(directory), device="cuda", fast=True)
    assert isinstance(fast, RSDPolicy) and not fast.speculative
    assert eager._graphed is None
    assert fast._graphed is not None and fast._graphed.compiled  # graphed=True, compile_heads=True
    n, same_codes, seen = 6, 0, []
    for seed in range(n):
        obs, text = fake_observation(seed), INSTRUCTIONS[seed % len(INSTRUCTIONS)]
        want, got = eager.predict_chunk(obs, text), fast.predict_chunk(obs, text)
        assert got.info["graphed"] is True and want.info["graphed"] is False
        assert got.info["speculative"] is False and got.actions.shape == want.actions.shape
        with torch.inference_mode():
            hidden = fast.backbone.encode(obs, text).to(cuda, torch.float32)  # [1, D]
            hidden_eager = eager.backbone.encode(obs, text).to(cuda, torch.float32)
            torch.testing.assert_close(hidden, hidden_eager, rtol=0, atol=1e-6)  # same weights, same kernels
            codes, norm = fast._graphed.decode_to_host(hidden)  # what predict_chunk decoded: [1, C, H, L], [1, C, A]
            # every code is the eager head's argmax given its own prefix, up to a rounding tie
            assert float(argmax_regret(eager.head, hidden, codes.to(cuda)).max()) <= TIE
            # the chunk is those codes detokenized (eagerly) and post-processed
            eager_norm = eager.tokenizer.decode_from_indices(codes.to(cuda))[0].cpu().numpy()
            np.testing.assert_allclose(got.actions, eager.postprocess(eager_norm), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.actions, fast.postprocess(norm[0].numpy()), rtol=0, atol=1e-6)
            if torch.equal(codes, greedy_decode(eager.head, hidden).cpu()):
                same_codes += 1
                np.testing.assert_allclose(got.actions, want.actions, rtol=1e-5, atol=1e-5)
        seen.append(got.actions)
    assert same_codes >= n - 1, f"the compiled heads broke a rounding tie in {n - same_codes} of {n} chunks"
    assert len({a.tobytes() for a in seen}) > 1  # the comparisons mean something only if chunks depend on obs


def test_fast_with_nothing_to_speed_up_is_refused(tmp_path: Path, cuda) -> None:
    """TinyBackbone has no set_fast: a speculative RSD policy (decoder kept) or an L1 policy would run as before."""
    speculative = tiny_rsd_policy(speculative=True).save_pretrained(tmp_path / "speculative")
    l1 = tiny_l1_policy().save_pretrained(tmp_path / "l1")
    with pytest.raises(ConfigError, match=r"nothing to speed up.*decodes speculatively.*TinyBackbone"):
        make_policy(str(speculative), device="cuda", fast=True)
    with pytest.raises(ConfigError, match=r"nothing to speed up.*'l1' policy.*TinyBackbone"):
        make_policy(str(l1), device="cuda", fast=True)
    assert isinstance(make_policy(str(l1), device="cuda"), L1Policy)  # without --fast: as before


def test_fast_speculative_rsd_keeps_its_decoder_and_speeds_the_backbone(tmp_path: Path, cuda,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from rsd.backbones.openvla import OpenVLAOFTBackbone
    from tests._openvla_tiny import build_tiny_oft_checkpoint, tiny_observation

    ckpt = build_tiny_oft_checkpoint(tmp_path / "openvla-7b-oft-finetuned-libero-spatial")
    backbone = OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_spatial", device="cpu", dtype="bfloat16")
    directory = tiny_rsd_policy(backbone, speculative=True).save_pretrained(tmp_path / "rsd-on-oft")
    eager = make_policy(str(directory), device="cuda")
    capsys.readouterr()
    fast = make_policy(str(directory), device="cuda", fast=True)
    assert "speculative, kept" in capsys.readouterr().err
    assert isinstance(fast, RSDPolicy) and fast.speculative and fast._graphed is None  # decoding mode unchanged
    assert fast.backbone.fast and fast.backbone.model.fast_path_key == (True, True, None)  # compiled, CUDA graphs
    assert not eager.backbone.fast
    for seed, text in enumerate(INSTRUCTIONS):
        obs = tiny_observation(seed)
        with torch.inference_mode():
            h_fast, h_eager = fast.backbone.encode(obs, text), eager.backbone.encode(obs, text)
        assert _rel(h_fast, h_eager) < 2e-2, _rel(h_fast, h_eager)  # bf16: compiled vs eager rounding
        chunk = fast.predict_chunk(obs, text)
        assert chunk.info["speculative"] is True and chunk.info["graphed"] is False and "spec_stats" in chunk.info
        assert chunk.actions.shape == (fast.config.chunk_len, 7)


def test_fast_openvla_oft_pipeline_compiles_the_backbone(tmp_path: Path, cuda) -> None:
    from tests._openvla_tiny import INSTRUCTIONS as OFT_INSTRUCTIONS
    from tests._openvla_tiny import build_tiny_oft_checkpoint, tiny_observation

    ckpt = build_tiny_oft_checkpoint(tmp_path / "openvla-7b-oft-finetuned-libero-spatial")
    eager = make_policy(f"openvla-oft:{ckpt}", suite="libero_spatial", device="cuda")
    fast = make_policy(f"openvla-oft:{ckpt}", suite="libero_spatial", device="cuda", fast=True)
    assert not eager.backbone.fast
    assert fast.backbone.fast and fast.backbone.model.fast_path_key == (True, True, None)
    for seed, text in enumerate(OFT_INSTRUCTIONS):
        obs = tiny_observation(seed)
        want, got = eager.backbone.predict_actions(obs, text), fast.backbone.predict_actions(obs, text)
        assert _rel(got, want) < 2e-2, _rel(got, want)  # normalized [1, C, A], bf16 tolerance
        chunk = fast.predict_chunk(obs, text)
        assert chunk.actions.shape == (8, 7) and np.isfinite(chunk.actions).all()
    with pytest.raises(ConfigError, match="scripted"):
        make_policy("expert", device="cuda", fast=True)

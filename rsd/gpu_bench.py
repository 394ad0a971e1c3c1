"""CUDA latency breakdown of the RSD pipeline over an OpenVLA-shaped backbone, with floors.

``run_breakdown(backbone="openvla-shaped", device="cuda", iters=50, num_images=2) -> dict`` (what ``rsd
bench --device cuda`` calls) measures, at batch 1, for the eager path and the fast path (CUDA graphs,
``rsd.fastpath``), with ``num_images`` 2 (OFT on LIBERO: full + wrist image, 545 tokens with the LIBERO
prompt) or 1 (full image only, OFT's 1-image configuration: 289 tokens):

- ``vision``     both towers on both images + projector + proprio token (GPU time, CUDA events)
- ``llm``        the 7B decoder over the whole sequence -> last hidden state (GPU time)
- ``backbone``   the two above as one call, ``OpenVLAModel.rsd_hidden`` (GPU time)
- ``encode``     ``Backbone.encode``: host preprocessing + the above + checks (wall clock)
- ``rsd_decode`` heads + argmax + layout + RFSQ decode: greedy, and speculative in its worst case
                 (the draft is rejected at layer 0) and best case (all k draft layers accepted)
- ``predict_chunk`` ``RSDPolicy.predict_chunk`` end to end (wall clock) with ``_greedy`` eager heads,
                 ``_graphed`` ``RSDPolicy(graphed=True)`` (one CUDA graph for heads..decode),
                 ``_graphed_compiled`` the same with ``compile_heads=True`` (compiled variants only), ``_spec``
                 speculative with the random draft (``exact``: rejected at layer 0, the worst case) and
                 ``_spec_full_accept`` speculative ``exact`` with a draft built to propose the main head's
                 greedy codes (:func:`full_accept_draft`: all k layers accepted, the best case)
- ``pipeline_graphed_decode`` fast encode + :class:`rsd.fastpath.GraphedRSDDecoder` + the policy's
                 post-processing (what ``predict_chunk`` costs once the policy uses the graphed decode)

Variants: ``eager`` (the plain module), ``graph`` (the same module in CUDA graphs), ``optimized_eager``
(``OpenVLAModel.optimize_for_inference``, no graphs), ``fast`` (both: what ``set_fast(True)`` runs) and
``fast_compiled`` (``set_fast(True, compile=True)``: also torch.compile'd layers and decode rollout) and, with
``autotune=True``, ``fast_autotune`` (the layers compiled with ``max-autotune-no-cudagraphs``; its decode graphs
keep inductor's default mode). :func:`heads_breakdown` (``--heads-only``) times the decode graphs alone.

and the floors: weight bytes / measured copy bandwidth, FLOPs (counted by
``torch.utils.flop_counter``) / measured bf16 matmul rate. Each timing is p50/p90 over ``iters``
runs after warm-up. Run ``python -m rsd.gpu_bench --num-images 1 --out results/gpu/<name>.json`` on a
CUDA machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.errors import ConfigError

__all__ = ["measure_ceilings", "time_cuda", "time_wall", "summarize", "count_flops", "kernel_breakdown",
           "full_accept_draft", "run_breakdown", "heads_breakdown", "format_breakdown", "main"]

GOAL_MS = 12.0  # the goal: full RSD predict_chunk on the OpenVLA-shaped model, batch 1

LIBERO_INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


# timing helpers


def summarize(ms: list[float]) -> dict[str, float | int]:
    """``{"p50", "p90", "min", "mean", "n"}`` of a list of milliseconds."""
    arr = np.asarray(ms, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)), "min": float(arr.min()),
            "mean": float(arr.mean()), "n": int(arr.size)}


def time_cuda(fn: Callable[[], Any], *, warmup: int = 5, iters: int = 50) -> list[float]:
    """GPU time of ``fn()`` per call in ms (a CUDA event pair around each call), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def time_wall(fn: Callable[[], Any], *, warmup: int = 5, iters: int = 50) -> list[float]:
    """Wall-clock ms per call of ``fn()`` (which must synchronize itself, e.g. return host data)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def count_flops(fn: Callable[..., Any], *args: Any) -> int:
    """FLOPs of ``fn(*args)`` as counted by ``torch.utils.flop_counter`` (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn(*args)
    return int(counter.get_total_flops())


def measure_ceilings(device: str | torch.device = "cuda", *, copy_gib: float = 2.0, mm: int = 8192,
                     iters: int = 10) -> dict[str, float]:
    """Measured ceilings: device-to-device copy bandwidth (bytes read + written per s) and the bf16
    matmul rate on random data (``mm``^3 product), each the median of ``iters`` timed runs."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    n = int(copy_gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_(-1, 1, generator=gen)  # allowed: ceiling input
    dst = torch.empty_like(src)
    copy_ms = statistics.median(time_cuda(lambda: dst.copy_(src), warmup=3, iters=iters))
    del src, dst
    # allowed: ceiling inputs (random, not zeros: zeros run faster than real data)
    a = torch.empty(mm, mm, dtype=torch.bfloat16, device=device).uniform_(-1, 1, generator=gen)
    b = torch.empty(mm, mm, dtype=torch.bfloat16, device=device).uniform_(-1, 1, generator=gen)
    mm_ms = statistics.median(time_cuda(lambda: a @ b, warmup=3, iters=iters))
    return {"copy_bytes_per_s": 2 * 2 * n / (copy_ms * 1e-3), "bf16_matmul_flop_per_s": 2 * mm**3 / (mm_ms * 1e-3),
            "copy_gib": copy_gib, "matmul_n": mm}


def kernel_breakdown(fn: Callable[[], Any], *, iters: int = 3, top: int = 12) -> dict[str, Any]:
    """GPU kernel time of ``fn()`` by category (matmul / attention / other) and the top kernels, per call,
    from ``torch.profiler`` (run eagerly: kernel times are those a graph replays, minus launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels.setdefault(event.name, []).append(event.device_time)  # microseconds
    def category(name: str) -> str:
        low = name.lower()
        if any(k in low for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "gemv", "splitk")):
            return "matmul"
        if any(k in low for k in ("flash", "fmha", "attention")):
            return "attention"
        return "other"
    totals: dict[str, float] = {}
    for name, times in kernels.items():
        totals[category(name)] = totals.get(category(name), 0.0) + sum(times) / 1e3 / iters
    ranked = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"ms_per_call": totals, "kernels_per_call": sum(len(t) for t in kernels.values()) / iters,
            "top": [{"name": n[:120], "ms_per_call": sum(t) / 1e3 / iters, "calls": len(t) / iters} for n, t in ranked]}


# the pipeline pieces


def _param_bytes(modules: list[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters(recurse=True))


def _forward_weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of the weights each part reads once per forward (blocks that never run are excluded)."""
    vb = model.vision_backbone
    tensors = []
    for tower in (vb.featurizer, vb.fused_featurizer):
        for module in (tower.patch_embed, *tower.blocks[: tower.spec.blocks_run]):
            tensors += list(module.parameters())
        tensors += [getattr(tower, n) for n in ("cls_token", "reg_token", "pos_embed") if hasattr(tower, n)]
    for module in (model.projector, model.proprio_projector):
        tensors += list(module.parameters())
    vision = sum(t.numel() * t.element_size() for t in tensors)
    llm = _param_bytes([*model.language_model.model.layers, model.language_model.model.norm])
    return {"vision": vision, "llm": llm, "backbone": vision + llm}


def _fake_observation(shape: Any, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # allowed: synthetic benchmark observation
    size = shape.image_size
    return {"full_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "state": rng.uniform(-1, 1, shape.proprio_dim).astype(np.float32)}


def _rsd_parts(cfg: Any, device: torch.device, seed: int) -> tuple[Any, Any, Any, Any]:
    """Random RSD heads + tokenizer at ``cfg`` sizes on ``device`` (weights are irrelevant for timing)."""
    from rsd.heads import DraftHead, RFSQHead
    from rsd.normalize import NormStats
    from rsd.tokenizer import RFSQTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head, draft, tok = RFSQHead(cfg), DraftHead(cfg), RFSQTokenizer.from_config(cfg)
    stats = NormStats(q01=[-1.0] * 6 + [0.0], q99=[1.0] * 7, mask=[True] * 6 + [False])
    return head.to(device).eval(), draft.to(device).eval(), tok.to(device).eval(), stats


def full_accept_draft(draft: torch.nn.Module, codes: torch.Tensor, *, margin: float = 30.0) -> torch.nn.Module:
    """A copy of ``draft`` (a :class:`rsd.heads.DraftHead`) whose argmax proposes ``codes`` [1, C, H, L]
    (layers ``0..k-1``) for any hidden state: the bias of its last Linear becomes ``margin`` at the
    target level of every token and 0 elsewhere; its weights stay (the same compute as a trained draft).
    For timing speculative decoding in its best case (every draft layer accepted under ``exact``) only."""
    import copy

    from einops import rearrange

    cfg = draft.cfg
    if codes.ndim != 4 or codes.shape[0] != 1 or tuple(codes.shape[1:]) != (cfg.chunk_len, cfg.latent_dim, cfg.num_layers):
        raise ConfigError(f"full_accept_draft needs codes [1, C, H, L] = [1, {cfg.chunk_len}, {cfg.latent_dim}, "
                          f"{cfg.num_layers}], got {list(codes.shape)}.")
    target = rearrange(codes[0, :, :, : cfg.draft_layers], "c h k -> k c h")  # [k, C, H]
    onehot = torch.nn.functional.one_hot(target, cfg.num_levels).to(draft.net[-1].bias.dtype)  # [k, C, H, G]
    built = copy.deepcopy(draft)
    with torch.no_grad():
        built.net[-1].bias.copy_(margin * rearrange(onehot, "k c h g -> (k c h g)"))
    return built


def _timed_chunks(policy: Any, obs: dict, instruction: str, warmup: int, iters: int) -> tuple[dict, dict, Any]:
    """Wall clock of ``policy.predict_chunk`` -> (summary, p50 of each ``info["timing_ms"]`` entry, last chunk)."""
    parts: dict[str, list[float]] = {}
    last: list[Any] = []

    def call() -> None:
        chunk = policy.predict_chunk(obs, instruction)
        for key, value in chunk.info["timing_ms"].items():
            parts.setdefault(key, []).append(value)
        last[:] = [chunk]

    summary = summarize(time_wall(call, warmup=warmup, iters=iters))
    return summary, {k: float(np.percentile(v[warmup:], 50)) for k, v in parts.items()}, last[0]


def _policy_rows(backbone: Any, head: Any, draft: Any, tok: Any, stats: Any, cfg: Any, dev: torch.device, obs: dict,
                 instruction: str, warmup: int, iters: int, graphed: bool = True,
                 compiled_heads: bool = False) -> tuple[dict, dict, dict]:
    """``RSDPolicy.predict_chunk`` over ``backbone`` with eager greedy heads, ``graphed=True`` (and
    ``graphed=True, compile_heads=True`` when ``compiled_heads``), the random draft and a full-accept draft
    -> (timings, parity, info) (see the module docstring)."""
    from rsd.policy import RSDPolicy
    from rsd.speculative import greedy_decode

    with torch.inference_mode():
        greedy_codes = greedy_decode(head, backbone.encode(obs, instruction))
    good_draft = full_accept_draft(draft, greedy_codes)
    policies = {"greedy": dict(speculative=False), "spec": dict(draft=draft, speculative=True),
                "spec_full_accept": dict(draft=good_draft, speculative=True)}
    if graphed:
        policies["graphed"] = dict(speculative=False, graphed=True)
    if compiled_heads:
        policies["graphed_compiled"] = dict(speculative=False, graphed=True, compile_heads=True)
    timings, info, chunks = {}, {}, {}
    for name, kwargs in policies.items():
        policy = RSDPolicy(backbone, head, tok, stats, config=cfg, device=dev, **kwargs)
        timings[f"predict_chunk_{name}"], info[f"predict_chunk_{name}_parts_p50"], chunks[name] = _timed_chunks(
            policy, obs, instruction, warmup, iters)
        if "spec_stats" in chunks[name].info:
            info[f"predict_chunk_{name}_accepted_layers"] = chunks[name].info["spec_stats"]["accepted_layers"]
    reference = chunks["greedy"].actions
    parity = {f"predict_chunk_{name}_actions_equal_greedy": bool(np.array_equal(chunk.actions, reference))
              for name, chunk in chunks.items() if name != "greedy"}
    parity.update({f"predict_chunk_{name}_actions_max_abs_diff_greedy": float(np.abs(chunk.actions - reference).max())
                   for name, chunk in chunks.items() if name != "greedy"})
    return timings, parity, {**info, "greedy_actions": reference}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def run_breakdown(backbone: str = "openvla-shaped", device: str = "cuda", iters: int = 50, *, size: str = "7b",
                  num_images: int = 2, warmup: int = 5, seed: int = 0, fast: bool = True, ceilings: bool = True,
                  instruction: str = LIBERO_INSTRUCTION, profile: bool = False, fp32_reference: bool = True,
                  attribution: bool = True, autotune: bool = False, regret_samples: int = 1024,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Latency breakdown (see the module docstring) -> a JSON-able dict. ``backbone`` must be
    ``openvla-shaped`` (random weights; the real checkpoint is timed the same way through its model).
    ``attribution``: also time the ``graph`` and ``optimized_eager`` variants; ``autotune``: also the
    ``fast_autotune`` variant (compiled with ``max-autotune-no-cudagraphs``); ``regret_samples``: random
    hidden states on which the compiled decode graph's codes are checked with ``argmax_regret``."""
    from rsd.backbones.openvla_shaped import OpenVLAShapedBackbone
    from rsd.config import RSDConfig
    from rsd.fastpath import CudaGraphFn, GraphedRSDDecoder, argmax_regret
    from rsd.policy import RSDPolicy
    from rsd.speculative import SpeculativeDecoder, greedy_decode

    say = log or (lambda _msg: None)
    if backbone != "openvla-shaped":
        raise ConfigError(f"run_breakdown times the random-weight 'openvla-shaped' backbone, got {backbone!r}.")
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"run_breakdown needs a CUDA device, got {device!r} (cuda available: {torch.cuda.is_available()}).")
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone, "size": size, "num_images": num_images, "batch": 1, "iters": iters, "warmup": warmup,
        "dtype": "bfloat16",
    }
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    if ceilings:
        say("ceilings")
        out["ceilings"] = measure_ceilings(dev)

    say("building the random-weight model")
    t0 = time.perf_counter()
    eager_bb = OpenVLAShapedBackbone(size, device=dev, seed=seed, num_images=num_images)
    out["build_s"] = time.perf_counter() - t0
    model, shape = eager_bb.model, eager_bb.shape
    obs = _fake_observation(shape, seed)
    groups = eager_bb.inputs(obs, instruction)
    images, ids, proprio, _ = groups[0]
    with torch.inference_mode():
        vision = model.vision_embeds(images, proprio)
        sequence = model.prompt_sequence(vision, ids)
    out["sequence"] = {"total_tokens": int(sequence.shape[1]), "vision_tokens": int(vision.shape[1]) - 1,
                       "proprio_tokens": 1, "prompt_tokens_incl_bos": int(ids.shape[1]), "instruction": instruction,
                       "attention": "bidirectional" if shape.bidirectional else "causal",
                       "tokenizer": "stand-in (one token per word/punctuation; rsd.backbones.openvla_shaped)"}

    flops = {"vision": count_flops(model.vision_embeds, images, proprio),
             "llm": count_flops(model.llm_last_hidden, sequence)}
    flops["backbone"] = flops["vision"] + flops["llm"]
    wbytes = _forward_weight_bytes(model)
    out["flops"], out["weight_bytes"] = flops, wbytes
    if ceilings:
        c = out["ceilings"]
        out["floors_ms"] = {part: {"compute": 1e3 * flops[part] / c["bf16_matmul_flop_per_s"],
                                   "weights": 1e3 * wbytes[part] / c["copy_bytes_per_s"]} for part in flops}
        for part in out["floors_ms"]:
            out["floors_ms"][part]["floor"] = max(out["floors_ms"][part].values())

    cfg = RSDConfig(hidden_dim=eager_bb.hidden_dim)  # the seed's sizes: C=8 H=16 L=8 G=7 k=3 (D=4096 for 7b)
    head, draft, tok, stats = _rsd_parts(cfg, dev, seed)
    with torch.inference_mode():
        hidden = eager_bb.encode(obs, instruction)  # float32 [1, D]

    def rsd_eager() -> torch.Tensor:
        return tok.decode_from_indices(greedy_decode(head, hidden))

    spec_worst = SpeculativeDecoder(draft, head, mode="exact")
    spec_best = SpeculativeDecoder(draft, head, mode="relaxed", threshold=cfg.num_levels - 1)  # accepts every layer

    def spec_decode(decoder: SpeculativeDecoder) -> Callable[[], torch.Tensor]:
        return lambda: tok.decode_from_indices(decoder.decode(hidden)[0])

    timings: dict[str, dict[str, Any]] = {"eager": {}, "fast": {}}  # + "graph", "optimized_eager" (attribution)
    e = timings["eager"]
    say("timing eager")
    with torch.inference_mode():
        e["vision"] = summarize(time_cuda(lambda: model.vision_embeds(images, proprio), warmup=warmup, iters=iters))
        e["llm"] = summarize(time_cuda(lambda: model.llm_last_hidden(sequence), warmup=warmup, iters=iters))
        e["backbone"] = summarize(time_cuda(lambda: model.rsd_hidden(images, ids, proprio), warmup=warmup, iters=iters))
        e["encode"] = summarize(time_wall(lambda: eager_bb.encode(obs, instruction), warmup=warmup, iters=iters))
        e["rsd_decode_greedy"] = summarize(time_wall(rsd_eager, warmup=warmup, iters=iters))
        e["rsd_decode_spec_worst"] = summarize(time_wall(spec_decode(spec_worst), warmup=warmup, iters=iters))
        e["rsd_decode_spec_best"] = summarize(time_wall(spec_decode(spec_best), warmup=warmup, iters=iters))
        out["spec_stats"] = {"worst": spec_worst.decode(hidden)[1].to_dict(), "best": spec_best.decode(hidden)[1].to_dict()}
    say("policies over the eager backbone")
    rows, policy_parity, policy_info = _policy_rows(eager_bb, head, draft, tok, stats, cfg, dev, obs, instruction,
                                                    warmup, iters)
    e.update(rows)
    eager_actions = policy_info.pop("greedy_actions")
    out["policy_parity"] = {"eager": policy_parity}
    out["policy_info"] = {"eager": policy_info}
    if fp32_reference:  # the same weights in float32: how far is each bf16 variant from exact arithmetic?
        say("float32 reference")
        import copy

        with torch.inference_mode():
            reference = copy.deepcopy(model).float()
            hidden32 = reference.rsd_hidden(images, ids, proprio).float()
            del reference
            torch.cuda.empty_cache()
        out["fp32_reference_rel_err"] = {"eager": _rel_err(hidden, hidden32)}
    if profile:
        say("profiling eager")
        out["kernel_profile"] = {"eager": {"llm": kernel_breakdown(lambda: model.llm_last_hidden(sequence)),
                                           "vision": kernel_breakdown(lambda: model.vision_embeds(images, proprio)),
                                           "rsd_decode": kernel_breakdown(rsd_eager)}}

    if fast:
        with torch.inference_mode():
            eager_vision = model.vision_embeds(images, proprio)
            parity: dict[str, Any] = {}  # relative errors / max diffs of each variant against plain eager
            if attribution:
                # 1) CUDA graphs of the unchanged module: launch overhead only
                say("graphs of the eager module")
                g = timings["graph"] = {}
                g_vision, g_llm = CudaGraphFn(model.vision_embeds, device=dev), CudaGraphFn(model.llm_last_hidden, device=dev)
                g_backbone = CudaGraphFn(model.rsd_hidden, device=dev)
                parity["graph_hidden_rel_err"] = _rel_err(g_backbone(images, ids, proprio).float(), hidden)
                g["vision"] = summarize(time_cuda(lambda: g_vision(images, proprio), warmup=warmup, iters=iters))
                g["llm"] = summarize(time_cuda(lambda: g_llm(sequence), warmup=warmup, iters=iters))
                g["backbone"] = summarize(time_cuda(lambda: g_backbone(images, ids, proprio), warmup=warmup, iters=iters))
                del g_vision, g_llm, g_backbone
                # 2) optimize_for_inference (fused matmuls, trimmed last layer, concurrent towers), eager
                say("optimized module, eager")
                model.optimize_for_inference()
                o = timings["optimized_eager"] = {}
                parity["optimized_eager_hidden_rel_err"] = _rel_err(model.rsd_hidden(images, ids, proprio).float(), hidden)
                o["vision"] = summarize(time_cuda(lambda: model.vision_embeds(images, proprio), warmup=warmup, iters=iters))
                o["llm"] = summarize(time_cuda(lambda: model.llm_last_hidden(sequence), warmup=warmup, iters=iters))
                o["backbone"] = summarize(time_cuda(lambda: model.rsd_hidden(images, ids, proprio), warmup=warmup, iters=iters))
        # 3) the fast path = optimized module + CUDA graphs (what Backbone.set_fast(True) runs),
        # 4) then the same with torch.compile'd layers (set_fast(True, compile=True)), 5) optionally autotuned
        variants = [("fast", False, None), ("fast_compiled", True, None)]
        if autotune:
            variants.append(("fast_autotune", True, "max-autotune-no-cudagraphs"))
        for variant, compiled, mode in variants:
            say(variant)
            f = timings[variant] = {}
            t_compile = time.perf_counter()
            try:
                eager_bb.set_fast(True, compile=compiled, compile_mode=mode)
                g_vision = CudaGraphFn(model.vision_embeds, device=dev)
                g_llm = CudaGraphFn(model.llm_last_hidden, device=dev)
                g_decode = GraphedRSDDecoder(head, tok, device=dev, compile=compiled)
                with torch.inference_mode():
                    fast_hidden = eager_bb.encode(obs, instruction)
                    decoded = g_decode.decode(hidden)
            except Exception as exc:  # report why (e.g. no compiler toolchain); the eager/fast numbers stand
                out[f"{variant}_error"] = f"{type(exc).__name__}: {exc}"
                say(f"{variant} failed: {exc}")
                break
            out[f"{variant}_setup_s"] = time.perf_counter() - t_compile
            with torch.inference_mode():
                if fp32_reference:
                    out["fp32_reference_rel_err"][variant] = _rel_err(fast_hidden, hidden32)
                parity.update({
                    f"{variant}_hidden_rel_err": _rel_err(fast_hidden, hidden),
                    f"{variant}_hidden_max_abs_diff": float((fast_hidden - hidden).abs().max()),
                    f"{variant}_vision_rel_err": _rel_err(g_vision(images, proprio), eager_vision),
                    f"{variant}_decode_codes_equal_eager": bool(torch.equal(decoded[0], greedy_decode(head, hidden))),
                })
                f["vision"] = summarize(time_cuda(lambda: g_vision(images, proprio), warmup=warmup, iters=iters))
                f["llm"] = summarize(time_cuda(lambda: g_llm(sequence), warmup=warmup, iters=iters))
                f["backbone"] = summarize(time_cuda(lambda: eager_bb._hidden_fn(images, ids, proprio), warmup=warmup,
                                                    iters=iters))
                f["encode"] = summarize(time_wall(lambda: eager_bb.encode(obs, instruction), warmup=warmup, iters=iters))
                f["rsd_decode_greedy"] = summarize(time_wall(lambda: g_decode.decode(hidden), warmup=warmup, iters=iters))
                f["rsd_decode_greedy_graph_gpu"] = summarize(time_cuda(lambda: g_decode._graph(hidden),
                                                                       warmup=warmup, iters=iters))
            out.setdefault("decode_kernels", {})[variant] = kernel_breakdown(lambda: g_decode._run(hidden), top=6)
            if variant == "fast_compiled":  # host copies and the plain graph under the same backbone; tie check
                say("graphed decode: to host, plain vs compiled, argmax regret")
                g_plain = GraphedRSDDecoder(head, tok, device=dev)
                with torch.inference_mode():
                    for name, dec in (("plain", g_plain), ("compiled", g_decode)):
                        dec.decode_to_host(hidden)
                        f[f"rsd_decode_{name}_to_host"] = summarize(time_wall(lambda: dec.decode_to_host(hidden),
                                                                              warmup=warmup, iters=iters))
                    f["rsd_decode_plain_graph_gpu"] = summarize(time_cuda(lambda: g_plain._graph(hidden),
                                                                          warmup=warmup, iters=iters))
                    gen = torch.Generator(dev).manual_seed(seed)
                    many = hidden.std() * torch.randn(  # allowed: tie-check probes at the real hidden state's scale
                        regret_samples, hidden.shape[1], device=dev, generator=gen)
                    many[0] = hidden[0]
                    many_codes = g_decode.decode(many)[0]
                    regret = argmax_regret(head, many, many_codes)
                    parity["compiled_decode_regret"] = {
                        "samples": regret_samples, "max": float(regret.max()),
                        "samples_with_regret_gt_0": int((regret > 0).sum()),
                        "codes_equal_eager_fraction": float((many_codes == greedy_decode(head, many)).double().mean()),
                        "logit_std": float(head(many).std()),
                    }
                out["decode_kernels"][f"{variant}_plain"] = kernel_breakdown(lambda: g_plain._run(hidden), top=6)
                del g_plain
            say(f"policies over the {variant} backbone")
            rows, policy_parity, policy_info = _policy_rows(eager_bb, head, draft, tok, stats, cfg, dev, obs,
                                                            instruction, warmup, iters, compiled_heads=compiled)
            f.update(rows)
            fast_actions = policy_info.pop("greedy_actions")
            out["policy_parity"][variant], out["policy_info"][variant] = policy_parity, policy_info
            parity[f"{variant}_predict_chunk_actions_max_abs_diff"] = float(np.abs(fast_actions - eager_actions).max())
            fast_policy = RSDPolicy(eager_bb, head, tok, stats, config=cfg, draft=draft, speculative=False, device=dev)

            def fast_pipeline() -> np.ndarray:  # fast backbone + graphed decode + RSDPolicy's post-processing
                h = eager_bb.encode(obs, instruction)
                return fast_policy.postprocess(g_decode.decode(h)[1][0].float().cpu().numpy())

            with torch.inference_mode():
                f["pipeline_graphed_decode"] = summarize(time_wall(fast_pipeline, warmup=warmup, iters=iters))
                parity[f"{variant}_pipeline_actions_max_abs_diff"] = float(np.abs(fast_pipeline() - eager_actions).max())
            if profile:
                say(f"profiling {variant}")
                out.setdefault("kernel_profile", {})[variant] = {
                    "llm": kernel_breakdown(lambda: model.llm_last_hidden(sequence)),
                    "vision": kernel_breakdown(lambda: model.vision_embeds(images, proprio)),
                    "rsd_decode": kernel_breakdown(lambda: g_decode._run(hidden)),
                }
        out["parity"] = parity
    out["timings_ms"] = timings
    out["goal_predict_chunk_le_12ms"] = {
        f"{variant}/{part}": {"p50": t["p50"], "p90": t["p90"], "met_p50": t["p50"] <= GOAL_MS, "met_p90": t["p90"] <= GOAL_MS}
        for variant, parts in timings.items() for part, t in parts.items()
        if part.startswith("predict_chunk") or part == "pipeline_graphed_decode"}
    out["memory_gib"] = {"max_allocated": torch.cuda.max_memory_allocated(dev) / 2**30}
    return out


def heads_breakdown(device: str = "cuda", iters: int = 200, *, warmup: int = 20, seed: int = 0,
                    modes: tuple[str, ...] = ("default",),
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Heads + argmax + layout + decode alone, at the default sizes (D=4096), batch 1: the plain graph and
    the compiled graph (each inductor ``mode`` in ``modes``), as GPU time of the replay (CUDA events) and
    wall time of ``decode`` (one sync) and ``decode_to_host`` (what ``RSDPolicy(graphed=True)`` calls),
    each measured twice: after an idle second and right after 2 s of large bf16 matmuls (a busy, hot GPU),
    with the SM clock read (NVML) before each; plus the parts: the bare graph replay (GPU) and all four
    graph outputs copied to the host (wall) instead of the one packed vector. -> JSON-able dict."""
    from rsd.config import RSDConfig
    from rsd.fastpath import GraphedRSDDecoder, argmax_regret

    say = log or (lambda _msg: None)
    dev = torch.device(device)
    cfg = RSDConfig()
    head, _, tok, _ = _rsd_parts(cfg, dev, seed)
    gen = torch.Generator(dev).manual_seed(seed)
    hidden = torch.randn(1, cfg.hidden_dim, device=dev, generator=gen)  # allowed: timing input
    probe = torch.randn(256, cfg.hidden_dim, device=dev, generator=gen)  # allowed: tie-check input
    a = torch.empty(8192, 8192, dtype=torch.bfloat16, device=dev).uniform_(-1, 1, generator=gen)  # allowed: load

    def sm_clock_mhz() -> int | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            return int(pynvml.nvmlDeviceGetClockInfo(pynvml.nvmlDeviceGetHandleByIndex(index), pynvml.NVML_CLOCK_SM))
        except Exception as exc:  # noqa: BLE001 - a missing NVML loses the clock column, and says why in the JSON
            out["sm_clock_error"] = f"{type(exc).__name__}: {exc}"
            say(f"no SM clock: {exc}")
            return None

    def load(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(10):
                a @ a
            torch.cuda.synchronize(dev)

    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "iters": iters,
                           "warmup": warmup, "config": cfg.to_dict(), "variants": {}}
    decoders = {"plain": GraphedRSDDecoder(head, tok, device=dev)}
    for mode in modes:
        decoders[f"compiled_{mode}"] = GraphedRSDDecoder(head, tok, device=dev, compile=True,
                                                         compile_mode=None if mode == "default" else mode)
    with torch.inference_mode():
        for name, decoder in decoders.items():
            say(f"heads: {name}")
            t0 = time.perf_counter()
            decoder.decode(hidden)
            decoder.decode_to_host(hidden)
            row: dict[str, Any] = {"setup_s": time.perf_counter() - t0,
                                   "max_regret_256": float(argmax_regret(head, probe, decoder.decode(probe)[0]).max())}
            for state in ("idle", "after_load"):
                if state == "after_load":
                    load(2.0)
                else:
                    time.sleep(1.0)
                row[f"{state}_sm_clock_mhz"] = sm_clock_mhz()
                row[f"{state}_graph_gpu"] = summarize(time_cuda(lambda: decoder._graph(hidden), warmup=warmup, iters=iters))
                row[f"{state}_decode_wall"] = summarize(time_wall(lambda: decoder.decode(hidden), warmup=warmup, iters=iters))
                row[f"{state}_to_host_wall"] = summarize(time_wall(lambda: decoder.decode_to_host(hidden), warmup=warmup,
                                                                   iters=iters))
                # the parts: the bare replay (GPU), and all four outputs copied to the host (wall) instead of
                # decode_to_host's one packed vector
                graph = next(iter(decoder._graph._graphs.values()))
                row[f"{state}_replay_only_gpu"] = summarize(time_cuda(graph.graph.replay, warmup=warmup, iters=iters))
                row[f"{state}_all_outputs_to_host_wall"] = summarize(time_wall(lambda: decoder._graph.to_host(hidden),
                                                                               warmup=warmup, iters=iters))
            row["kernels"] = kernel_breakdown(lambda: decoder._run(hidden), top=4)
            out["variants"][name] = row
    return out


def format_breakdown(result: dict[str, Any]) -> str:
    """The breakdown as a text table: p50 (p90) ms per part and variant, and the floor."""
    variants = [v for v in ("eager", "graph", "optimized_eager", "fast", "fast_compiled", "fast_autotune")
                if result["timings_ms"].get(v)]
    lines = [f"{result['gpu']}  torch {result['torch']}  images {result.get('num_images', 2)}  "
             f"tokens {result['sequence']['total_tokens']}  p50 (p90) ms",
             f"{'part':26s}" + "".join(f"{v:>22s}" for v in variants) + f"{'floor':>8s}"]
    floors = result.get("floors_ms", {})
    parts = sorted({p for v in variants for p in result["timings_ms"][v]})
    for part in parts:
        cells = []
        for variant in variants:
            t = result["timings_ms"][variant].get(part)
            cells.append(f"{t['p50']:10.3f} ({t['p90']:8.3f})" if t else f"{'-':>21s}")
        floor = f"{floors[part]['floor']:8.2f}" if part in floors else ""
        lines.append(f"{part:26s}" + " ".join(cells) + floor)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsd.gpu_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=None,
                        help="timed calls per measurement (default: 50; 200 with --heads-only)")
    parser.add_argument("--size", default="7b", choices=["7b", "tiny"])
    parser.add_argument("--num-images", type=int, default=2, choices=[1, 2],
                        help="2: full + wrist image (OFT on LIBERO, 545 tokens); 1: full image only (289 tokens)")
    parser.add_argument("--no-fast", action="store_true")
    parser.add_argument("--no-attribution", action="store_true",
                        help="skip the attribution variants 'graph' and 'optimized_eager'")
    parser.add_argument("--autotune", action="store_true",
                        help="add 'fast_autotune': layers compiled with mode=max-autotune-no-cudagraphs (minutes)")
    parser.add_argument("--profile", action="store_true", help="add a kernel-time breakdown (torch.profiler)")
    parser.add_argument("--heads-only", action="store_true",
                        help="time only heads + argmax + layout + decode (plain and compiled graphs, idle and hot GPU); "
                             "reads --iters, --autotune (adds a max-autotune compiled graph) and --out only")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    if args.heads_only:
        modes = ("default", "max-autotune-no-cudagraphs") if args.autotune else ("default",)
        result = heads_breakdown(iters=args.iters or 200, modes=modes, log=lambda m: print(f"[bench] {m}", flush=True))
        text = json.dumps(result, indent=2, sort_keys=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        for name, row in result["variants"].items():
            print(f"{name:18s} " + "  ".join(f"{state}: clock {row[f'{state}_sm_clock_mhz']} replay {row[f'{state}_replay_only_gpu']['p50']:.3f} "
                                            f"gpu {row[f'{state}_graph_gpu']['p50']:.3f} decode {row[f'{state}_decode_wall']['p50']:.3f} "
                                            f"4 copies {row[f'{state}_all_outputs_to_host_wall']['p50']:.3f} to_host "
                                            f"{row[f'{state}_to_host_wall']['p50']:.3f} (p90 {row[f'{state}_to_host_wall']['p90']:.3f})"
                                            for state in ("idle", "after_load"))
                  + f"  regret {row['max_regret_256']:.2e}")
        return 0
    result = run_breakdown(iters=args.iters or 50, size=args.size, num_images=args.num_images, fast=not args.no_fast,
                           profile=args.profile, attribution=not args.no_attribution, autotune=args.autotune,
                           log=lambda m: print(f"[bench] {m}", flush=True))
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(format_breakdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

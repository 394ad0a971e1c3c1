"""GPU timing helpers: CUDA-event and wall-clock timers, p50/p90 summaries, FLOP counts, the measured
ceilings (copy bandwidth, bf16 matmul rate) and a kernel-level profile."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


GOAL_MS = 12.0  # target: full RSD predict_chunk on the OpenVLA-shaped model, batch 1

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

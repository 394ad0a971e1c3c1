"""``heads_breakdown`` (``--heads-only``): the heads + argmax + layout + decode graphs alone, idle and hot GPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from rsd.gpu_bench.breakdown import random_rsd_parts
from rsd.gpu_bench.timing import kernel_breakdown, summarize, time_cuda, time_wall


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
    head, _, tok, _ = random_rsd_parts(cfg, dev, seed)
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

"""Latency of the pipeline parts, one row per part (p50 / p90 / mean in ms, batch 1).

Parts: backbone encode; RFSQ head greedy decoding (main only); speculative decoding (draft + verify + rest);
argmax + layout; RFSQ decode; the whole ``RSDPolicy.predict_chunk``; the L1 baseline's ``predict_chunk``.
Weights are random (this measures time, not quality). ``--backbone openvla-shaped --device cuda`` runs the
GPU breakdown of the OpenVLA-shaped model (rsd.gpu_bench) instead, with the physical floor.

Examples:
    rsd bench                          # default sizes (C=8 A=7 H=16 L=8 G=7, D=4096) on the CPU
    rsd bench --config tiny --iters 50
    rsd bench --json out/bench.json
    rsd bench --backbone openvla-shaped --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rsd.config import RSDConfig
from rsd.errors import ConfigError
from rsd.stats import percentiles

HELP = "latency table for the pipeline parts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=["default", "tiny"], default="default",
                        help="head/tokenizer sizes: the default sizes (C=8 H=16 L=8 G=7, D=4096) or the tiny test sizes (default: %(default)s)")
    parser.add_argument("--backbone", choices=["tiny", "openvla-shaped"], default="tiny",
                        help="backbone to time: the CPU TinyBackbone, or the 7B OpenVLA-shaped model (CUDA only)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=200, help="timed iterations per part (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed warm-up iterations (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def time_call(fn: Callable[[], Any], *, iters: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Per-call wall time in ms (CUDA-synchronized on GPU) -> p50, p90, mean, n."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        samples.append(1e3 * (time.perf_counter() - t0))
    return {**percentiles(samples), "mean": float(np.mean(samples)), "n": iters}


def cpu_breakdown(config: RSDConfig, *, device: str = "cpu", iters: int = 200, warmup: int = 20) -> dict[str, Any]:
    """Time every part of the pipeline at ``config`` sizes with random weights (seeded)."""
    from rsd.backbones import TinyBackbone
    from rsd.heads import DraftHead, L1ActionHead, RFSQHead
    from rsd.layout import logits_to_codes
    from rsd.normalize import NormStats
    from rsd.policy import L1Policy, RSDPolicy
    from rsd.speculative import SpeculativeDecoder, greedy_decode
    from rsd.tokenizer import RFSQTokenizer

    dev = torch.device(device)
    torch.manual_seed(0)
    backbone = TinyBackbone(hidden_dim=config.hidden_dim, image_size=224).to(dev).eval()
    head, draft = RFSQHead(config).to(dev).eval(), DraftHead(config).to(dev).eval()
    tokenizer = RFSQTokenizer.from_config(config).to(dev).eval()
    stats = NormStats(q01=-np.ones(config.action_dim), q99=np.ones(config.action_dim),
                      mask=[True] * (config.action_dim - 1) + [False])
    rsd = RSDPolicy(backbone, head, tokenizer, stats, config=config, draft=draft, device=dev)
    l1 = L1Policy(backbone, L1ActionHead(config).to(dev).eval(), stats, config=config, device=dev)
    spec = SpeculativeDecoder(draft, head, mode="exact")

    obs = backbone.observation_spec.fake(seed=0)  # both cameras at 224 px and the proprio vector
    instruction = "pick up the black bowl between the plate and the ramekin and place it on the plate"
    with torch.inference_mode():
        hidden = backbone.encode(obs, instruction).to(dev)
        codes = greedy_decode(head, hidden)
        logits = head(hidden)
        parts: dict[str, Callable[[], Any]] = {
            "backbone (TinyBackbone, 2 images 224 px)": lambda: backbone.encode(obs, instruction),
            "RFSQ head greedy (main only, L steps)": lambda: greedy_decode(head, hidden),
            "speculative decode (draft + verify + rest)": lambda: spec.decode(hidden),
            "argmax + layout": lambda: logits_to_codes(logits),
            "RFSQ decode (codes -> actions)": lambda: tokenizer.decode_from_indices(codes),
            "head + argmax + layout + decode": lambda: tokenizer.decode_from_indices(greedy_decode(head, hidden)),
            "RSDPolicy.predict_chunk (speculative)": lambda: rsd.predict_chunk(obs, instruction),
            "L1Policy.predict_chunk": lambda: l1.predict_chunk(obs, instruction),
        }
        rows = {name: time_call(fn, iters=iters, warmup=warmup, device=dev) for name, fn in parts.items()}
        _, spec_stats = spec.decode(hidden)
    return {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": config.to_dict(), "iters": iters, "warmup": warmup,
        "parts_ms": rows,
        "speculative_stats_random_weights": spec_stats.to_dict(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_table(result: dict[str, Any]) -> str:
    width = max(len(k) for k in result["parts_ms"]) + 2
    lines = [f"rsd bench — {result['device']} (torch {result['torch']}, {result['threads']} threads), "
             f"config {result['config']}", f"{'part'.ljust(width)}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}"]
    for name, row in result["parts_ms"].items():
        lines.append(f"{name.ljust(width)}{row['p50']:>10.3f}{row['p90']:>10.3f}{row['mean']:>10.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    for name, value, low in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}.")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backbone == "openvla-shaped":
        from rsd.gpu_bench import format_breakdown, run_breakdown

        result = run_breakdown(backbone="openvla-shaped", device=args.device, iters=args.iters)
        print(format_breakdown(result))
    else:
        config = RSDConfig() if args.config == "default" else RSDConfig.tiny()
        result = cpu_breakdown(config, device=args.device, iters=args.iters, warmup=args.warmup)
        print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

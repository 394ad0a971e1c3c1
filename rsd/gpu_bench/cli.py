"""``python -m rsd.gpu_bench``: the breakdown as a table and a JSON file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rsd.gpu_bench.breakdown import run_breakdown
from rsd.gpu_bench.heads import heads_breakdown


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
    if args.iters is not None and args.iters < 1:
        parser.error(f"--iters must be >= 1, got {args.iters}")
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

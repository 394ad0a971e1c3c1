"""Policy latency of the packaged low-dimensional policies per decoding mode (one predict_chunk per call).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_lowdim.py [--calls 300] [--device cpu]

Observations are the contract's fake ones (``ObservationSpec(images=(), objects=True).fake``: proprio + 3 object
poses), the instruction a libero_spatial one. Prints p50/p90 ms of ``predict_chunk`` (backbone, heads, decode,
un-normalize) after 20 warm-up calls, for L1, RSD greedy, RSD speculative exact (without and with the greedy check
that ``rsd eval --decode exact`` runs by default) and relaxed thresholds 1 and 2, plus the mean accepted draft layers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rsd.observation import ObservationSpec
from rsd.policy import load_policy
from rsd.policy.packaged import PACKAGED_POLICIES

INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    spec = ObservationSpec(images=(), objects=True)
    observations = [spec.fake(seed=i) for i in range(args.calls)]
    variants = [("L1", "lowdim-l1", {}), ("RSD greedy", "lowdim", {"decode": "greedy"}),
                ("RSD spec exact", "lowdim", {"decode": "exact", "check_greedy": False}),
                ("RSD spec exact + greedy check", "lowdim", {"decode": "exact", "check_greedy": True}),
                ("RSD spec relaxed 1", "lowdim", {"decode": "relaxed", "threshold": 1}),
                ("RSD spec relaxed 2", "lowdim", {"decode": "relaxed", "threshold": 2})]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}, {args.calls} calls")
    print(f"{'variant':<32} {'p50 ms':>7} {'p90 ms':>7} {'accepted layers':>16}")
    for name, which, kw in variants:
        policy = load_policy(PACKAGED_POLICIES[which], device=args.device, **kw)
        for obs in observations[:20]:
            policy.predict_chunk(obs, INSTRUCTION)
        times, accepted = [], []
        for obs in observations:
            t0 = time.perf_counter()
            chunk = policy.predict_chunk(obs, INSTRUCTION)
            times.append(1e3 * (time.perf_counter() - t0))
            if "spec_stats" in chunk.info:
                accepted.append(chunk.info["spec_stats"]["mean_accepted_layers"])
        p50, p90 = np.percentile(times, [50, 90])
        acc = f"{np.mean(accepted):.2f}" if accepted else "-"
        print(f"{name:<32} {p50:>7.2f} {p90:>7.2f} {acc:>16}")


if __name__ == "__main__":
    main()

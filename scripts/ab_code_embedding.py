"""A/B on the CPU: the head's code embedding as gather + sum (what rsd.heads does) against F.embedding_bag on
the same weights, interleaved, greedy decoding at the default sizes, 1 thread.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ab_code_embedding.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from rsd.config import RSDConfig
from rsd.heads import RFSQHead
from rsd.speculative import greedy_decode


def _bag_context(self: RFSQHead, context: torch.Tensor, codes: torch.Tensor, layer: int) -> torch.Tensor:
    rows = rearrange(codes, "b c h -> b (c h)") + self.code_offsets[layer]
    return context + F.embedding_bag(rows, self.code_embedding.weight, mode="sum")


def main(rounds: int = 20, calls: int = 50) -> None:
    torch.set_num_threads(1)
    cfg = RSDConfig()
    torch.manual_seed(0)
    head = RFSQHead(cfg).eval()
    hidden = torch.randn(1, cfg.hidden_dim)
    variants = {"gather + sum (rsd.heads)": RFSQHead._next_context, "F.embedding_bag": _bag_context}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for name, fn in variants.items():
                    RFSQHead._next_context = fn
                    for _ in range(5):
                        greedy_decode(head, hidden)
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        greedy_decode(head, hidden)
                        times[name].append(1e3 * (time.perf_counter() - t0))
    finally:
        RFSQHead._next_context = variants["gather + sum (rsd.heads)"]
    for name, ms in times.items():
        print(f"{name:26s} median {np.median(ms):.3f} ms  (n={len(ms)})")


if __name__ == "__main__":
    main()

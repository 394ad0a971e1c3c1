"""Does a policy's chunk for one observation depend on the batch it is computed in, or on the run?

    python scripts/batch_consistency.py --policy results/pixel/policy_s0/rsd --device cuda --json out.json

For B fake observations (``ObservationSpec().fake``, 224 px views), computes every row's chunk (1) alone, twice
(run-to-run determinism at batch 1), (2) inside a batch of all B, (3) inside batches of other sizes and orders, and
reports per setting how many rows' actions differ bit for bit from the row alone, the largest difference, and (RSD)
how many rows' tokens differ. With ``--deterministic``, cuDNN runs deterministic algorithms without autotuning
(``torch.backends.cudnn``) in this process first, as ``rsd eval``'s episodes do in their own process.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from rsd.observation import ObservationSpec
from rsd.policy import load_policy

INSTRUCTIONS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
                "pick up the alphabet soup and place it in the basket"]


def _tokens(chunk) -> np.ndarray | None:
    """An RSD chunk's code histogram per layer (``info``), which changes when a token does; None for L1."""
    histogram = chunk.info.get("code_histogram")
    return None if histogram is None else np.asarray(histogram)


def _run(policy, observations, instructions, rows: list[int], pad_to: int = 0, fixed: bool = False
         ) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """Chunks of ``rows`` in one ``predict_chunks``; with ``pad_to``, filler rows (observation -1) fill the batch,
    and with ``fixed`` each row r sits at position r of the ``pad_to`` rows (a slot's fixed place)."""
    rows = list(rows)
    if fixed:
        order = [r if r in rows else -1 for r in range(pad_to)]
    else:
        order = rows + [-1] * max(0, pad_to - len(rows))
    slots = list(range(len(order)))
    for s in slots:
        policy.reset_slot(s)
    chunks = policy.predict_chunks([observations[r] for r in order], [instructions[r] for r in order], slots)
    return {r: (np.asarray(c.actions, dtype=np.float64), _tokens(c)) for r, c in zip(order, chunks) if r >= 0}


def compare(policy, batch: int, seed: int) -> list[dict]:
    spec = ObservationSpec()
    observations = [spec.fake(seed + i) for i in range(batch)] + [spec.fake(seed + 10_000)]  # [-1]: the filler
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch + 1)]
    alone = {}
    for r in range(batch):
        alone.update(_run(policy, observations, instructions, [r]))
    rng = np.random.default_rng(seed)
    settings = {"alone again": [[r] for r in range(batch)], f"all {batch} in order": [list(range(batch))],
                f"all {batch} shuffled": [list(rng.permutation(batch))]}
    for size in (2, 3, 5, 8):
        if size < batch:
            order = list(rng.permutation(batch))
            settings[f"batches of {size}"] = [order[i:i + size] for i in range(0, batch, size)]
    report = []

    def measure(name: str, groups: list, reference: dict, pad_to: int = 0, fixed: bool = False) -> None:
        got = {}
        for g in groups:
            got.update(_run(policy, observations, instructions, [int(r) for r in g], pad_to, fixed))
        diff = [float(np.abs(got[r][0] - reference[r][0]).max()) for r in range(batch)]
        tok = [reference[r][1] is not None and bool((got[r][1] != reference[r][1]).any()) for r in range(batch)]
        report.append({"setting": name, "rows": batch, "rows_actions_differ": sum(d > 0 for d in diff),
                       "max_abs_action_diff": max(diff), "rows_tokens_differ": sum(tok)})

    for name, groups in settings.items():
        measure(name, groups, alone)
    padded_alone = {}  # every batch padded to `batch` rows: the same shape whatever the group
    for r in range(batch):
        padded_alone.update(_run(policy, observations, instructions, [r], batch))
    for name, groups in settings.items():
        if name != "alone again":
            measure(f"padded to {batch}: {name} (against padded alone)", groups, padded_alone, batch)
    fixed_alone = {}  # padded, and row r always at position r
    for r in range(batch):
        fixed_alone.update(_run(policy, observations, instructions, [r], batch, fixed=True))
    for name, groups in settings.items():
        if name != "alone again" and "shuffled" not in name:
            measure(f"padded to {batch}, row r at position r: {name} (against the same alone)", groups, fixed_alone,
                    batch, fixed=True)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", required=True, help="a saved policy directory (repeatable)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    out = {"device": a.device, "torch": torch.__version__, "deterministic": a.deterministic,
           "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None, "policies": {}}
    for path in a.policy:
        kw = {"decode": "greedy"} if path.rstrip("/").endswith("rsd") else {}
        policy = load_policy(path, device=a.device, **kw)
        rows = compare(policy, a.batch, a.seed)
        out["policies"][path] = rows
        for r in rows:
            print(json.dumps({"policy": path, **r}), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

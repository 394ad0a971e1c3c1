"""Data scaling: closed-loop success of RSD and L1 policies against demonstrations per task, one PNG + one JSON.

    python scripts/plot_scaling.py --out results/learned/scaling \
        10=runs/local/scaling_sp10_rsd,runs/local/scaling_sp10_l1 25=... 45=...

Each point is ``N=RSD_RUN_DIR,L1_RUN_DIR``: two `rsd eval` output directories of policies trained on N demos per task.
Success rates and their Wilson 95 % intervals come from each run's summary.json (recomputed with rsd.stats).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rsd.stats import rate_estimate


def _overall(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    o = summary["overall"]
    est = rate_estimate(int(o["successes"]), int(o["n"]))
    return {"run": str(run), "n": est.n, "successes": est.successes, "rate": est.rate, "ci_low": est.ci_low,
            "ci_high": est.ci_high, "command": summary.get("command")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("points", nargs="+", help="N=RSD_RUN_DIR,L1_RUN_DIR")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="libero_spatial: success vs demonstrations per task")
    args = parser.parse_args()
    rows = []
    for point in args.points:
        n, dirs = point.split("=", 1)
        rsd_dir, l1_dir = dirs.split(",")
        rows.append({"demos_per_task": int(n), "rsd": _overall(Path(rsd_dir)), "l1": _overall(Path(l1_dir))})
    rows.sort(key=lambda r: r["demos_per_task"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = [r["demos_per_task"] for r in rows]
    for key, label, offset in (("rsd", "RSD (RFSQ head, greedy)", -0.4), ("l1", "L1 head", 0.4)):
        ys = [r[key]["rate"] for r in rows]
        lo = [r[key]["rate"] - r[key]["ci_low"] for r in rows]
        hi = [r[key]["ci_high"] - r[key]["rate"] for r in rows]
        ax.errorbar([x + offset for x in xs], ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax.set_xlabel("demonstrations per task (clean expert demos)")
    ax.set_ylabel("success (Wilson 95 % CI)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(xs)
    ax.set_title(args.title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "scaling.png", dpi=110)
    for r in rows:
        print(f"{r['demos_per_task']:>4} demos/task: RSD {r['rsd']['successes']}/{r['rsd']['n']} "
              f"({100 * r['rsd']['rate']:.1f} %), L1 {r['l1']['successes']}/{r['l1']['n']} ({100 * r['l1']['rate']:.1f} %)")
    print(f"wrote {args.out}/scaling.json and scaling.png")


if __name__ == "__main__":
    main()

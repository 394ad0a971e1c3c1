"""How `rsd eval` scales with workers: episodes per minute for K = 1, 2, 4, ... workers, per backend.

Weak scaling: with K workers the run evaluates ``--episodes-per-worker`` x K episodes (every task of the suite,
``trials = episodes-per-worker x K / tasks``), so every K sees the same mix of tasks and each worker the same
amount of work. Each point is one whole `rsd eval` command, timed from outside as a user would see it (start-up of
the workers, the policy and the envs included), into its own results directory.

    python scripts/eval_scaling.py --out runs/scaling --workers 1 2 4 8 16 --backends local ray \
        --policy lowdim --suite libero_spatial --episodes-per-worker 10

Writes OUT/scaling.json (per backend, K and repeat: episodes, successes, wall, episodes per minute, parallel
efficiency = rate(K) / (K x rate(1)) with rate(1) the mean of the K = 1 repeats, mean episode wall time, and the same
rate and efficiency counting only the workers' time in episodes, i.e. without start-up and shut-down, with the
overhead in seconds and the host's load average before the point) and OUT/scaling.png. Any argument after ``--``
goes to every `rsd eval` unchanged (default: ``--no-render --device cpu``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the point is recorded without it
        return None


def run_point(out: Path, backend: str, workers: int, repeat: int, args: argparse.Namespace, extra: list[str]) -> dict:
    trials = args.episodes_per_worker * workers // args.tasks
    if trials * args.tasks != args.episodes_per_worker * workers:
        raise SystemExit(f"--episodes-per-worker x K must be a multiple of --tasks ({args.tasks}); K = {workers}.")
    if trials > 50:
        raise SystemExit(f"K = {workers}: {trials} trials per task, but a LIBERO task has 50 init states; pass more "
                         f"--tasks or fewer --episodes-per-worker.")
    run_dir = out / f"{backend}_k{workers:02d}" if repeat == 0 else out / f"{backend}_k{workers:02d}_r{repeat}"
    cmd = [sys.executable, "-m", "rsd.cli", "eval", "--suite", args.suite, "--policy", args.policy,
           "--tasks", f"0-{args.tasks - 1}", "--trials", str(trials), "--workers", str(workers),
           "--backend", backend, "--out", str(run_dir), "--no-progress", *extra]
    print(f"eval_scaling: {backend} K={workers} repeat {repeat}: {' '.join(cmd[1:])}", flush=True)
    load_before = _loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"eval_scaling: {backend} K={workers} exited {proc.returncode}")
    records = [json.loads(x) for x in (run_dir / "episodes.jsonl").read_text().splitlines() if x.strip()]
    episode_wall = [r["wall_s"] for r in records]
    busy = sum(episode_wall) / workers  # seconds each worker spent in episodes, on average
    return {"backend": backend, "workers": workers, "repeat": repeat, "episodes": len(records),
            "successes": sum(r["success"] for r in records), "wall_s": round(wall, 2),
            "episodes_per_min": round(60.0 * len(records) / wall, 2),
            "mean_episode_wall_s": round(sum(episode_wall) / len(episode_wall), 3),
            # the rate without start-up and shut-down: episodes over the average worker's time in episodes
            "episodes_per_min_in_episodes": round(60.0 * len(records) / busy, 2),
            "overhead_s": round(wall - busy, 2),  # start-up, shut-down, idle tail of the last episodes
            "load_before": load_before, "policy_steps": sum(r["steps"] for r in records)}


def efficiencies(points: list[dict]) -> None:
    """``efficiency`` = rate(K) / (K x rate(1)) and ``efficiency_in_episodes`` (the same of the rates without
    start-up), with rate(1) the mean over that backend's K = 1 repeats."""
    for key, eff in (("episodes_per_min", "efficiency"), ("episodes_per_min_in_episodes", "efficiency_in_episodes")):
        for p in points:
            ones = [q[key] for q in points if q["backend"] == p["backend"] and q["workers"] == 1 and key in q]
            p[eff] = None if not ones or key not in p else round(p[key] / (p["workers"] * sum(ones) / len(ones)), 3)


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in sorted({p["backend"] for p in points}):
        pts = [p for p in points if p["backend"] == backend]
        ks = sorted({p["workers"] for p in pts})
        mean = {k: sum(p["episodes_per_min"] for p in pts if p["workers"] == k)
                / sum(1 for p in pts if p["workers"] == k) for k in ks}
        line, = ax.plot(ks, [mean[k] for k in ks], "o-", label=backend)
        if len(pts) > len(ks):  # repeats: every run as a dot, the line through their means
            ax.plot([p["workers"] for p in pts], [p["episodes_per_min"] for p in pts], ".", color=line.get_color(),
                    alpha=0.5)
        if 1 in mean:
            ax.plot(ks, [k * mean[1] for k in ks], ":", color="grey", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("workers (one env + one policy each)")
    ax.set_ylabel("episodes per minute (end to end)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="dotted: K x rate(1)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = ["--no-render", "--device", "cpu"]
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--backends", nargs="+", default=["local"], choices=["local", "ray"])
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--policy", default="lowdim")
    parser.add_argument("--tasks", type=int, default=10, help="tasks 0..N-1 of the suite")
    parser.add_argument("--episodes-per-worker", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every point this many times, in rounds (round r: every backend and K once)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "scaling.json"
    earlier = json.loads(result_path.read_text()) if result_path.is_file() else {}
    points = list(earlier.get("points", []))
    command = " ".join(["python", "scripts/eval_scaling.py", *sys.argv[1:]])
    commands = [*earlier.get("commands", []), command]  # every call that added points
    for repeat, backend, k in itertools.product(range(args.repeats), args.backends, args.workers):
        if any(p["backend"] == backend and p["workers"] == k and p.get("repeat", 0) == repeat for p in points):
            continue  # measured by an earlier call (the script continues where it stopped)
        points.append(run_point(args.out, backend, k, repeat, args, extra))
        efficiencies(points)
        result = {"suite": args.suite, "policy": args.policy, "episodes_per_worker": args.episodes_per_worker,
                  "tasks": args.tasks, "eval_args": extra, "cores": os.cpu_count(),
                  "commands": commands, "points": points}
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(points[-1]), flush=True)
    plot(points, args.out / "scaling.png",
         f"rsd eval scaling: {args.suite}, {args.policy}, {args.episodes_per_worker} episodes per worker, "
         f"{os.cpu_count()} cores")
    print(f"eval_scaling: wrote {result_path} and {args.out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``rsd sensitivity``: how much token accuracy does task success need? Recorded expert demos are replayed open loop
from their own scenes, chunk by chunk through the RFSQ tokenizer with a chosen fraction of tokens replaced by wrong
levels, and LIBERO's success is measured against the realized token accuracy (the episodes: ``rsd.sensitivity_replay``;
the corruption: ``rsd.corruption``; the method and how to read the plot: docs/sensitivity.md).

Per demo: ``raw`` (the recorded actions, no tokenizer), ``roundtrip`` (the tokenizer, no token wrong: fraction 0 of
every mode) and every ``--modes`` x non-zero ``--fractions``: ``uniform`` draws the wrong tokens among all layers,
``coarse`` among ``--coarse-layers`` only, ``fine`` among the other layers. Demos: ``--episodes`` per point, the
same demos at every point, spread over the tasks (round robin, seeded order within a task), from the tokenizer's
held-out episodes when its ``report.json`` split lists some of ``--demos`` (``--pool auto``), else from all.

Writes to ``--out``: ``episodes.jsonl`` (one row per episode, appended as they finish; ``--resume`` skips rows
already there), ``sensitivity.json`` (per mode and fraction: n, successes, rate, Wilson 95 % CI, realized token
accuracy over all tokens of all chunks; the baselines, the command, versions) and ``sensitivity.png``, both
replaced atomically.

    rsd sensitivity --demos runs/demos/libero_spatial.hdf5 --episodes 50 --workers 16 --out runs/sensitivity \\
        --mark-accuracy 0.93 --mark-label "RSD head, held-out"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rsd.errors import ConfigError

__all__ = ["HELP", "add_arguments", "run", "select_demos"]

HELP = "token accuracy vs success: replay demos through the tokenizer with a share of tokens corrupted"
RESULTS_NAME, SUMMARY_NAME, PLOT_NAME = "episodes.jsonl", "sensitivity.json", "sensitivity.png"


def _floats(text: str) -> list[float]:
    try:
        return sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError as exc:
        raise ConfigError(f"--fractions takes numbers like '0,0.05,0.1', got {text!r}.") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rsd.policy.roundtrip import DEFAULT_TOKENIZER_DIR

    parser.add_argument("--demos", type=Path, nargs="+", required=True, help="HDF5 files written by `rsd collect`")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER_DIR,
                        help="tokenizer directory (tokenizer.* + action_stats.json; default: the packaged one)")
    parser.add_argument("--fractions", default="0,0.05,0.1,0.2,0.3,0.5",
                        help="shares of the mode's tokens to corrupt (0 = the plain round trip)")
    parser.add_argument("--modes", default="uniform,coarse,fine", help="comma list of uniform, coarse, fine")
    parser.add_argument("--coarse-layers", default="0-1", help="the coarse layers, e.g. '0-1' (fine = the rest)")
    parser.add_argument("--episodes", type=int, default=20, help="demos per point (the same demos at every point)")
    parser.add_argument("--pool", choices=("auto", "val", "all"), default="auto",
                        help="demos to choose from: the tokenizer's held-out ones (val), all, or val when the "
                             "tokenizer's report.json lists some of --demos (auto)")
    parser.add_argument("--no-hold", dest="hold", action="store_false",
                        help="end each episode after the demo's actions (default: hold still with the last gripper "
                             "command up to the suite's step budget)")
    parser.add_argument("--no-fixtures", dest="fixtures", action="store_false",
                        help="skip the walk that restores each scene's fixture poses (the replay is then not exact "
                             "on tasks with randomly placed fixtures)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7, help="seed of the corruption draws and of every episode")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue a run in --out with the same settings")
    parser.add_argument("--mark-accuracy", type=float, default=None,
                        help="a measured token accuracy (e.g. the learned head's held-out one), drawn as a line")
    parser.add_argument("--mark-label", default="learned head (held-out)")
    parser.add_argument("--no-progress", action="store_true")


def _held_out(tokenizer_dir: Path, files: Sequence[Path]) -> set[tuple[Path, str]]:
    """``(file, demo name)`` of the tokenizer's validation split (``report.json`` ``split.val``) that are in
    ``files``; paths compared resolved."""
    report = tokenizer_dir / "report.json"
    if not report.is_file():
        return set()
    val = (json.loads(report.read_text()).get("split") or {}).get("val") or []
    wanted = {f.resolve(): f for f in files}
    out = set()
    for entry in val:
        path, _, name = str(entry).rpartition(":")
        if Path(path).resolve() in wanted:
            out.add((wanted[Path(path).resolve()], name))
    return out


def select_demos(demos: Sequence[tuple[Path, Any]], n: int, seed: int, held_out: set[tuple[Path, str]],
                 pool: str) -> tuple[list[tuple[Path, Any]], str]:
    """``n`` demos, spread over (suite, task) round robin, in a ``seed``-ed order within each task."""
    use_val = pool == "val" or (pool == "auto" and bool(held_out))
    if pool == "val" and not held_out:
        raise ConfigError("--pool val: the tokenizer's report.json lists none of --demos as held out.")
    cands = [(p, d) for p, d in demos if not use_val or (p, d.name) in held_out]
    if n > len(cands):
        raise ConfigError(f"--episodes {n} > the {len(cands)} demos to choose from "
                          f"({'held out' if use_val else 'all'}); lower it or pass more --demos.")
    groups: dict[tuple[str, int], list[tuple[Path, Any]]] = {}
    for p, d in cands:
        groups.setdefault((str(d.attrs.get("rsd_suite")), int(d.attrs.get("rsd_task_id", -1))), []).append((p, d))
    rng = np.random.default_rng(seed)
    queues = [[g[i] for i in rng.permutation(len(g))] for _, g in sorted(groups.items())]
    chosen: list[tuple[Path, Any]] = []
    while len(chosen) < n:
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return chosen, ("held-out (tokenizer report.json split.val)" if use_val else "all demos")


def _load(files: Sequence[Path]) -> tuple[list[tuple[Path, Any]], dict[Path, int | None]]:
    import h5py

    from rsd.sim.demos import read_demos

    out, first_seeds = [], {}
    for path in files:
        if not path.is_file():
            raise ConfigError(f"--demos {path} does not exist.")
        with h5py.File(path) as f:
            first = f["data"].attrs.get("rsd_scene_seed_start")
        first_seeds[path] = None if first is None else int(first)
        for d in read_demos(path):
            if "rsd_scene_init_state" not in d.attrs or "rsd_task_id" not in d.attrs:
                raise ConfigError(f"{path}:{d.name} has no rsd_scene_init_state: record demos with `rsd collect`.")
            out.append((path, d))
    return out, first_seeds


def _jobs(chosen, conditions, seed, fixtures) -> list:
    from rsd.sensitivity_replay import ReplayJob, demo_id

    jobs = []
    for path, d in chosen:
        for cond, frac, layers in conditions:
            fx = fixtures.get(demo_id(path, d.name))
            jobs.append(ReplayJob(demo_id=demo_id(path, d.name), suite=str(d.attrs["rsd_suite"]),
                                  task_id=int(d.attrs["rsd_task_id"]), scene_state=np.asarray(d.attrs["rsd_scene_init_state"]),
                                  actions=d.actions, condition=cond, fraction=frac, layers=tuple(layers), seed=seed,
                                  fixtures=fx))
    return sorted(jobs, key=lambda j: (j.suite, j.task_id, j.demo_id))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rsd.corruption import mode_layers, parse_layers
    from rsd.eval.rundir import write_json_atomic
    from rsd.filelock import exclusive_lock
    from rsd.limits import check_seed, check_workers
    from rsd.sensitivity_replay import RAW, ROUNDTRIP, ChunkCodec, Replayer, demo_id, walk_fixtures

    check_seed(args.seed)
    check_workers(args.workers)
    if args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}.")
    fractions = _floats(args.fractions)
    if not fractions or fractions[0] < 0 or fractions[-1] > 1:
        raise ConfigError(f"--fractions must lie in [0, 1], got {args.fractions!r}.")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    codec = ChunkCodec.from_dir(str(args.tokenizer))
    coarse = parse_layers(args.coarse_layers, codec.num_layers)
    layers = {m: mode_layers(m, coarse, codec.num_layers) for m in modes}  # refuses unknown modes
    conditions = [(RAW, 0.0, ()), (ROUNDTRIP, 0.0, ())] + [(m, f, layers[m]) for m in modes for f in fractions if f > 0]
    settings = {"demos": [str(p) for p in args.demos], "tokenizer": str(args.tokenizer.resolve()),
                "fractions": fractions, "modes": {m: layers[m] for m in modes}, "coarse_layers": coarse,
                "fine_layers": mode_layers("fine", coarse, codec.num_layers) if len(coarse) < codec.num_layers else [],
                "episodes": args.episodes, "pool": args.pool, "hold": args.hold, "fixtures": args.fixtures,
                "seed": args.seed, "num_layers": codec.num_layers, "num_levels": codec.levels,
                "chunk_len": codec.chunk_len}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / ".lock", what=f"rsd sensitivity is writing {out}", fix="choose another --out"):
        done = _prepare(out, settings, args.resume)
        demos, first_seeds = _load(args.demos)
        chosen, pool_note = select_demos(demos, args.episodes, args.seed, _held_out(args.tokenizer, args.demos),
                                         args.pool)
        t0 = time.perf_counter()
        with Replayer(str(args.tokenizer), hold=args.hold, workers=args.workers) as replayer:
            fixtures = (walk_fixtures(chosen, first_seeds, replayer.fixtures, fix="pass --no-fixtures")
                        if args.fixtures else {})
            walk_s = time.perf_counter() - t0
            jobs = [j for j in _jobs(chosen, conditions, args.seed, fixtures) if j.key not in done]
            bar = tqdm(total=len(jobs), unit="ep", desc="rsd sensitivity", disable=args.no_progress, file=sys.stderr)
            errors = 0
            with open(out / RESULTS_NAME, "a") as f:
                for row in replayer.results(jobs):
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    errors += row.get("error") is not None
                    bar.update(1)
                    bar.set_postfix(errors=errors)
                    if errors:
                        break
            bar.close()
        rows = [json.loads(line) for line in (out / RESULTS_NAME).read_text().splitlines() if line.strip()]
        from rsd.eval.report import versions

        summary = summarize(rows, settings, modes, fractions)
        summary.update(command=shlex.join(["rsd", "sensitivity", *sys.argv[2:]]) if sys.argv[1:2] == ["sensitivity"]
                       else shlex.join(sys.argv), versions=versions(), selection=pool_note,
                       demos_used=[demo_id(p, d.name) for p, d in chosen],
                       mark=None if args.mark_accuracy is None else {"accuracy": args.mark_accuracy,
                                                                     "label": args.mark_label},
                       wall_s={"fixture_walk": walk_s, "total": time.perf_counter() - t0})
        write_json_atomic(out / SUMMARY_NAME, summary)
        plot(summary, out / PLOT_NAME)
    print(f"wrote {out / SUMMARY_NAME} and {out / PLOT_NAME}")
    if errors:
        bad = next(r for r in rows if r.get("error"))
        print(f"rsd sensitivity: episode {bad['demo']} {bad['condition']} {bad['fraction']} failed: {bad['error']}\n"
              f"{bad.get('traceback', '')}", file=sys.stderr)
        return 1
    return 0


def _prepare(out: Path, settings: dict[str, Any], resume: bool) -> set:
    """Check ``out`` (a new run, or ``--resume`` of one with these settings); the keys of the rows already there."""
    from rsd.eval.rundir import write_json_atomic

    run_file, results = out / "run.json", out / RESULTS_NAME
    if run_file.exists() and not resume:
        raise ConfigError(f"{out} holds a sensitivity run: pass --resume to continue it or choose another --out.")
    if resume and run_file.exists():
        saved = json.loads(run_file.read_text())
        if saved != json.loads(json.dumps(settings)):
            diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != json.loads(json.dumps(settings)).get(k))
            raise ConfigError(f"--resume with other settings than {run_file} ({', '.join(diff)}).")
    write_json_atomic(run_file, settings)
    if not results.exists():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if r.get("error") is None]  # errored episodes run again
    tmp = results.with_name(results.name + ".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, results)
    return {(r["demo"], r["condition"], float(r["fraction"])) for r in keep}


def _point(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from rsd.stats import rate_estimate

    n, ok = len(rows), sum(bool(r["success"]) for r in rows)
    tokens, bad = sum(r.get("tokens", 0) for r in rows), sum(r.get("corrupted", 0) for r in rows)
    return {**rate_estimate(ok, n).to_dict(), "token_accuracy": (1.0 - bad / tokens) if tokens else None,
            "tokens": tokens, "corrupted": bad,
            "arm_mae": float(np.mean([r["arm_mae"] for r in rows])) if rows and "arm_mae" in rows[0] else None,
            "mean_steps": float(np.mean([r["steps"] for r in rows])) if rows else None}


def summarize(rows: Sequence[dict[str, Any]], settings: dict[str, Any], modes: Sequence[str],
              fractions: Sequence[float]) -> dict[str, Any]:
    """Per condition and fraction: n, successes, rate, Wilson 95 % CI, realized token accuracy (over all tokens of
    all chunks of the point's episodes), mean arm error in env units; fraction 0 of every mode is the round trip."""
    from rsd.sensitivity_replay import RAW, ROUNDTRIP

    def pick(cond: str, frac: float) -> list[dict[str, Any]]:
        return [r for r in rows if r["condition"] == cond and float(r["fraction"]) == frac and r.get("error") is None]

    roundtrip = _point(pick(ROUNDTRIP, 0.0))
    points = {m: [{"fraction": f, **(roundtrip if f == 0 else _point(pick(m, f)))} for f in fractions] for m in modes}
    walls = [r["wall_s"] for r in rows if "wall_s" in r]
    return {"format": "rsd.sensitivity", "format_version": 1, "settings": settings,
            "baselines": {RAW: _point(pick(RAW, 0.0)), ROUNDTRIP: roundtrip}, "points": points,
            "episodes": len(rows), "errors": sum(r.get("error") is not None for r in rows),
            "episode_wall_s": {"mean": float(np.mean(walls)) if walls else None,
                               "p50": float(np.median(walls)) if walls else None}}


def plot(summary: dict[str, Any], path: Path) -> None:
    """Success rate vs realized token accuracy, one line per mode with its Wilson band; the baselines as horizontal
    lines, the mark as a vertical one. Written through a rename."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    layers = summary["settings"]["modes"]
    for mode, pts in summary["points"].items():
        pts = [p for p in pts if p["n"] and p["token_accuracy"] is not None]
        x = np.array([100 * p["token_accuracy"] for p in pts])
        order = np.argsort(x)
        y = np.array([100 * p["rate"] for p in pts])[order]
        lo = np.array([100 * p["ci_low"] for p in pts])[order]
        hi = np.array([100 * p["ci_high"] for p in pts])[order]
        (line,) = ax.plot(x[order], y, marker="o", label=f"{mode} (layers {_span(layers[mode])})")
        ax.fill_between(x[order], lo, hi, color=line.get_color(), alpha=0.15)
    for name, style in (("raw", ":"), ("roundtrip", "--")):
        b = summary["baselines"][name]
        if b["n"]:
            ax.axhline(100 * b["rate"], color="gray", linestyle=style, linewidth=1,
                       label=f"{name} replay {b['successes']}/{b['n']}")
    mark = summary.get("mark")
    if mark:
        ax.axvline(100 * mark["accuracy"], color="black", linewidth=1.2,
                   label=f"{mark['label']}: {100 * mark['accuracy']:.1f}%")
    ax.set_xlabel("token accuracy over all tokens of all chunks (%)")
    ax.set_ylabel("success rate (%), Wilson 95% CI")
    ax.set_ylim(-2, 102)
    n = max((p["n"] for pts in summary["points"].values() for p in pts), default=0)
    ax.set_title(f"open-loop replay of {n} demos through the tokenizer, tokens corrupted at random", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def _span(layers: Sequence[int]) -> str:
    ls = list(layers)
    return f"{ls[0]}-{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) and len(ls) > 1 else ",".join(map(str, ls))

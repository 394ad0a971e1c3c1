"""Side by side: several ``rsd eval`` runs in one table, from their ``summary.json`` (``scripts/compare_runs.py``).

One row per run: policy, decoding (``--decode`` and threshold; the effective mode of ``saved`` in brackets), suite,
n, successes, success rate with its Wilson 95 % interval (``rsd.stats``), policy latency p50/p90 per chunk, mean
accepted draft layers, chunks that differed from greedy decoding / chunks checked, and the command that produced the
run. ``--per-task``: one row per task, one success column per run. A directory without ``summary.json`` is refused
(:class:`ConfigError`), as is a ``summary.json`` rsd eval did not write.

    python scripts/compare_runs.py RUN_DIR [RUN_DIR ...] [--per-task] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from rsd.errors import ConfigError, RSDError
from rsd.eval.rundir import RUN_NAME, SUMMARY_NAME
from rsd.stats import rate_estimate

__all__ = ["load_run", "run_rows", "task_rows", "render", "main"]

COLUMNS = ("run", "policy", "decode", "suite", "n", "succ", "rate", "95% CI", "p50 ms", "p90 ms", "acc layers",
           "greedy diff", "command")


def load_run(directory: str | Path) -> dict[str, Any]:
    """``summary.json`` of an rsd eval run (with ``run.json`` under ``"run"`` when present)."""
    directory = Path(directory)
    path = directory / SUMMARY_NAME
    if not path.is_file():
        raise ConfigError(f"{directory} has no {SUMMARY_NAME}: it is not the --out of a finished rsd eval (an eval "
                          f"writes it at its end; rerun it with --resume to write one).")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): rerun the eval with --resume to rewrite it.") from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("overall"), dict) or "per_task" not in summary:
        raise ConfigError(f"{path} is not an rsd eval summary (no overall / per_task blocks).")
    run_path = directory / RUN_NAME
    summary["run"] = json.loads(run_path.read_text(encoding="utf-8")) if run_path.is_file() else {}
    summary["dir"] = str(directory)
    return summary


def _decode_label(summary: Mapping[str, Any]) -> str:
    d = summary.get("decode") or {"mode": "saved"}  # summaries written before --decode existed
    label = d["mode"] + ("" if d.get("threshold") is None else f" {d['threshold']:g}")
    if d["mode"] == "saved" and d.get("effective"):
        eff = d["effective"] + ("" if d.get("effective_threshold") is None else f" {d['effective_threshold']:g}")
        label += f" ({eff})"
    return label + (" +check" if d.get("check_greedy") else "")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _rate_cells(block: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """n, successes, rate, Wilson interval: recomputed from the counts (rsd.stats), not copied."""
    n, k = int(block.get("n", 0)), int(block.get("successes", 0))
    if n == 0:
        return "0", "-", "-", "-"
    est = rate_estimate(k, n)
    return str(n), str(k), f"{100 * est.rate:.1f}%", f"{100 * est.ci_low:.1f}-{100 * est.ci_high:.1f}"


def run_rows(runs: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row (of :data:`COLUMNS`) per run."""
    rows = []
    for i, s in enumerate(runs, start=1):
        overall = s["overall"]
        spec = overall.get("speculative") or {}
        acc = spec.get("mean_accepted_layers")
        checked = spec.get("greedy_checked_chunks", 0)
        rows.append([str(i), str(s.get("policy", "")), _decode_label(s), str(s.get("suite", "")),
                     *_rate_cells(overall), _ms(overall.get("latency_p50_ms")), _ms(overall.get("latency_p90_ms")),
                     "-" if acc is None else f"{acc:.2f}",
                     f"{spec.get('greedy_mismatched_chunks', 0)}/{checked}" if checked else "-",
                     str(s.get("command") or s["run"].get("command") or "")])
    return rows


def task_rows(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``--per-task``: header and rows (task, name, then ``successes/n rate`` per run)."""
    header = ["task", "name", *(f"run {i}" for i in range(1, len(runs) + 1))]
    tasks = sorted({t for s in runs for t in s["per_task"]}, key=lambda t: int(t) if t.isdigit() else t)
    rows = []
    for t in [*tasks, "all"]:
        blocks = [s["overall"] if t == "all" else s["per_task"].get(t) for s in runs]
        name = next((b.get("name", "") for b in blocks if b and b.get("name")), "")
        cells = []
        for b in blocks:
            n, k, rate, ci = _rate_cells(b or {})
            cells.append("-" if b is None or n == "0" else f"{k}/{n} {rate} ({ci})")
        rows.append([t, name, *cells])
    return header, rows


def render(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    if markdown:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in (header, *rows)]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def _tables(runs: Sequence[Mapping[str, Any]], per_task: bool, markdown: bool) -> str:
    parts = [render(COLUMNS, run_rows(runs), markdown=markdown)]
    if per_task:
        parts.append(render(*task_rows(runs), markdown=markdown))
    legend = [f"run {i}: {s['dir']}" for i, s in enumerate(runs, start=1)]
    legend.append("rate: Wilson 95% CI; p50/p90: policy latency per chunk (with --check-greedy it includes the greedy "
                  "check; summary.json's speculative.latency_without_check_* leave it out); acc layers: mean accepted "
                  "draft layers per chunk; greedy diff: chunks differing from greedy / chunks checked")
    return "\n\n".join(parts) + "\n\n" + "\n".join(("- " if markdown else "") + x for x in legend)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out directories of rsd eval runs")
    parser.add_argument("--per-task", action="store_true", help="also a per-task table, one column per run")
    parser.add_argument("--markdown", metavar="FILE", default=None, help="also write the tables as Markdown to FILE")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.runs]
    except RSDError as exc:
        print(f"compare_runs: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(_tables(runs, args.per_task, markdown=False))
    if args.markdown:
        Path(args.markdown).write_text(_tables(runs, args.per_task, markdown=True) + "\n", encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0

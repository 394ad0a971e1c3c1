"""Side by side: several ``rsd eval`` runs in one table, from their ``summary.json`` (``scripts/compare_runs.py``).

One row per run: policy, decoding (``--decode`` and threshold; the effective mode of ``saved`` in brackets), suite,
n, successes, success rate with its Wilson 95 % interval (``rsd.stats``), policy latency p50/p90 per chunk, mean
accepted draft layers, chunks that differed from greedy decoding / chunks checked, and the command that produced the
run. ``--per-task``: one row per task, one success column per run. ``--plot FILE``: a PNG of the success rate per
task and overall, one bar per run with its Wilson 95 % interval, one subplot per suite (:func:`plot_per_task`), the
runs named in its legend by ``--labels`` (default: the run directories' names). A directory without ``summary.json``
is refused (:class:`ConfigError`), as is a ``summary.json`` rsd eval did not write.

    python scripts/compare_runs.py RUN_DIR [RUN_DIR ...] [--per-task] [--markdown FILE] [--plot FILE [--labels A,B]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from rsd.errors import ConfigError, RSDError
from rsd.eval.rundir import RUN_NAME, SUMMARY_NAME
from rsd.stats import rate_estimate

__all__ = ["load_run", "run_rows", "task_rows", "render", "plot_per_task", "main"]

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


def _task_ids(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The task ids of all runs, in numeric order, then ``"all"``."""
    return [*sorted({t for s in runs for t in s["per_task"]}, key=lambda t: int(t) if t.isdigit() else t), "all"]


def _blocks(runs: Sequence[Mapping[str, Any]], task: str) -> list[Mapping[str, Any] | None]:
    return [s["overall"] if task == "all" else s["per_task"].get(task) for s in runs]


def _task_name(blocks: Sequence[Mapping[str, Any] | None]) -> str:
    return next((b.get("name", "") for b in blocks if b and b.get("name")), "")


def task_rows(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``--per-task``: header and rows (task, name, then ``successes/n rate`` per run)."""
    header = ["task", "name", *(f"run {i}" for i in range(1, len(runs) + 1))]
    rows = []
    for t in _task_ids(runs):
        blocks = _blocks(runs, t)
        name = _task_name(blocks)
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


def _by_suite(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """The indices of ``runs`` per suite, suites in order of first appearance."""
    suites: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        suites.setdefault(str(run.get("suite") or "?"), []).append(i)
    return suites


def _tables(runs: Sequence[Mapping[str, Any]], per_task: bool, markdown: bool) -> str:
    parts = [render(COLUMNS, run_rows(runs), markdown=markdown)]
    if per_task:  # one table per suite: task i of one suite is another task than task i of the next
        suites = _by_suite(runs)
        for suite, ix in suites.items():
            header, rows = task_rows([runs[i] for i in ix])
            header = [*header[:2], *(f"run {i + 1}" for i in ix)]
            table = render(header, rows, markdown=markdown)
            parts.append(table if len(suites) == 1 else f"{suite}:\n{table}")
    legend = [f"run {i}: {s['dir']}" for i, s in enumerate(runs, start=1)]
    legend.append("rate: Wilson 95% CI; p50/p90: policy latency per chunk (with --check-greedy it includes the greedy "
                  "check; summary.json's speculative.latency_without_check_* leave it out); acc layers: mean accepted "
                  "draft layers per chunk; greedy diff: chunks differing from greedy / chunks checked")
    return "\n\n".join(parts) + "\n\n" + "\n".join(("- " if markdown else "") + x for x in legend)


def _short_names(names: Sequence[str], width: int = 28) -> list[str]:
    """Task names less the words all of them share at the start and the end, cut to ``width`` characters."""
    words = [n.split("_") for n in names]
    if len(words) > 1 and all(words):
        pre = len(os.path.commonprefix(words))
        suf = len(os.path.commonprefix([w[::-1] for w in words]))
        if all(len(w) > pre + suf for w in words):
            words = [w[pre:len(w) - suf] for w in words]
    short = [" ".join(w) for w in words]
    return [x if len(x) <= width else x[:width - 1].rstrip() + "\u2026" for x in short]


def _bar(block: Mapping[str, Any] | None) -> tuple[float, float, float]:
    """Rate, and its distance to the Wilson 95 % bounds below and above, in %; NaN where the run has no episodes."""
    block = block or {}
    n = int(block.get("n", 0))
    if n == 0:
        return float("nan"), 0.0, 0.0
    est = rate_estimate(int(block.get("successes", 0)), n)
    return 100 * est.rate, 100 * (est.rate - est.ci_low), 100 * (est.ci_high - est.rate)


def _check_labels(labels: Sequence[str], n_runs: int) -> None:
    if n_runs == 0:
        raise ConfigError("--plot needs at least one run.")
    if len(labels) != n_runs:
        raise ConfigError(f"--labels gives {len(labels)} labels ({', '.join(labels)}) for {n_runs} runs: "
                          f"give one label per run, in the runs' order.")
    if not all(str(x).strip() for x in labels):
        raise ConfigError(f"--labels has an empty label: {list(labels)}")


def plot_per_task(runs: Sequence[Mapping[str, Any]], labels: Sequence[str], path: str | Path) -> Any:
    """``--plot``: success rate per task and overall, one bar per run with its Wilson 95 % interval, one subplot per
    suite (stacked, in the runs' order), the runs named by ``labels`` (one colour per label across the subplots).
    Written to ``path`` (PNG) through a rename; returns the matplotlib ``Figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_labels(labels, len(runs))
    for s in runs:
        if not isinstance(s.get("per_task"), dict) or not s["per_task"]:
            raise ConfigError(f"run {s.get('dir', '?')} has no per_task results to plot.")
    suites = _by_suite(runs)
    for suite, ix in suites.items():
        named = [labels[i] for i in ix]
        twice = sorted({x for x in named if named.count(x) > 1})
        if twice:
            raise ConfigError(f"two runs of suite {suite} are both labelled {twice[0]!r}: their bars would look the "
                              f"same; give them different --labels.")
    colours = {x: f"C{k % 10}" for k, x in enumerate(dict.fromkeys(labels))}
    width = max(8.0, 2.5 + 0.28 * max(len(_task_ids([runs[i] for i in ix])) * len(ix) for ix in suites.values()))
    fig = Figure(figsize=(width, 4.2 * len(suites)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (suite, ix) in zip(fig.subplots(len(suites), 1, squeeze=False)[:, 0], suites.items()):
        group = [runs[i] for i in ix]
        tasks = _task_ids(group)
        short = _short_names([_task_name(_blocks(group, t)) or t for t in tasks[:-1]])
        x = list(range(len(tasks)))
        bar_w = 0.8 / len(group)
        for j, (s, i) in enumerate(zip(group, ix)):
            rate, lo, hi = zip(*(_bar(_blocks([s], t)[0]) for t in tasks))
            ax.bar([v + (j - (len(group) - 1) / 2) * bar_w for v in x], rate, bar_w, yerr=[lo, hi], capsize=2,
                   color=colours[labels[i]], ecolor="black", error_kw={"elinewidth": 0.8}, label=labels[i])
        ax.set_xticks(x, [f"{t}: {n}" for t, n in zip(tasks, short)] + ["all"], rotation=30, ha="right",
                      rotation_mode="anchor", fontsize=8)
        ax.axvline(len(tasks) - 1.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("success rate (%)")
        ax.set_title(f"{suite}: success per task, Wilson 95% CI", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out directories of rsd eval runs")
    parser.add_argument("--per-task", action="store_true", help="also a per-task table, one column per run")
    parser.add_argument("--markdown", metavar="FILE", default=None, help="also write the tables as Markdown to FILE")
    parser.add_argument("--plot", metavar="FILE", default=None,
                        help="also a PNG chart of the success rate per task, one bar per run, one subplot per suite")
    parser.add_argument("--labels", metavar="A,B,...", default=None,
                        help="--plot's legend: one label per run, comma separated (default: the run directory names)")
    args = parser.parse_args(argv)
    if args.labels is not None and not args.plot:
        parser.error("--labels names the runs in --plot's chart: give --plot FILE too")
    try:
        runs = [load_run(d) for d in args.runs]
        labels = ([x.strip() for x in args.labels.split(",")] if args.labels is not None else
                  [Path(d).resolve().name for d in args.runs])
        if args.plot:
            _check_labels(labels, len(runs))  # before the tables, not after them
        print(_tables(runs, args.per_task, markdown=False))
        if args.markdown:
            Path(args.markdown).write_text(_tables(runs, args.per_task, markdown=True) + "\n", encoding="utf-8")
            print(f"wrote {args.markdown}")
        if args.plot:
            plot_per_task(runs, labels, args.plot)
            print(f"wrote {args.plot}")
    except RSDError as exc:
        print(f"compare_runs: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0

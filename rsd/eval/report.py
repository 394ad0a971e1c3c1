"""What ``rsd eval`` reports: the summary of the recorded episodes (``summary.json``), the table it prints, the
plot (``summary.png``) and the facts a result depends on beyond its episodes (package versions, the renderer).

Rates come with Wilson 95 % intervals (``rsd.stats``); each (task, trial) counts once, from its last record.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rsd.eval.decoding import summarize_spec
from rsd.eval.records import EpisodeKey, EpisodeResult, latest_by_key
from rsd.stats import percentiles, rate_estimate

__all__ = ["summarize", "format_table", "plot_summary", "versions", "renderer_record", "renderer_warning",
           "protocol_block"]


def _task_block(records: Sequence[EpisodeResult]) -> dict[str, Any]:
    successes = sum(r.success for r in records)
    est = rate_estimate(successes, len(records))
    lat = percentiles([x for r in records for x in r.chunk_latencies_ms])
    ok_steps = [r.steps for r in records if r.success]
    return {
        "n": est.n, "successes": est.successes, "rate": est.rate, "ci_low": est.ci_low, "ci_high": est.ci_high,
        "mean_steps": float(np.mean([r.steps for r in records])) if records else None,
        "mean_steps_success": float(np.mean(ok_steps)) if ok_steps else None,
        "latency_p50_ms": lat["p50"], "latency_p90_ms": lat["p90"],
        "errors": sum(r.error is not None for r in records),
        "speculative": summarize_spec(records),
    }


def summarize(records: Sequence[EpisodeResult], keys: Sequence[EpisodeKey]) -> dict[str, Any]:
    """``overall`` and ``per_task`` blocks over the requested ``keys`` (last record of each; missing ones are
    counted in ``missing``, not as failures). Each block: n, successes, rate, ci_low, ci_high (Wilson 95 %),
    mean_steps, mean_steps_success, latency_p50_ms, latency_p90_ms (over every chunk), errors, and speculative (how
    an RSD policy decoded speculatively: ``rsd.eval.decoding.summarize_spec``; None for other policies)."""
    latest = latest_by_key(records)
    wanted = [latest[k] for k in sorted(keys) if k in latest]
    per_task: dict[str, Any] = {}
    for tid in sorted({k.task_id for k in keys}):
        task_records = [r for r in wanted if r.task_id == tid]
        block = _task_block(task_records)
        named = [r for r in task_records if r.task_name]
        block["name"] = named[0].task_name if named else ""
        block["instruction"] = named[0].instruction if named else ""
        block["requested"] = sum(1 for k in keys if k.task_id == tid)
        per_task[str(tid)] = block
    overall = _task_block(wanted)
    overall["requested"] = len(keys)
    missing = len(keys) - len(wanted)
    return {"overall": overall, "per_task": per_task, "missing": missing,
            "complete": missing == 0 and overall["errors"] == 0,
            "other_records": len([k for k in latest if k not in set(keys)])}


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """The per-task table printed at the end of an eval; with speculative decoding also the mean accepted draft
    layers (``acc``) and the chunks checked against greedy / differing from it (``greedy``), and per-layer
    acceptance rates under the table."""
    spec = summary["overall"].get("speculative") is not None
    head = f"{'task':>4}  {'n':>3}  {'succ':>4}  {'rate':>6}  {'95% CI':>13}  {'steps':>6}  {'p50 ms':>7}  " \
           f"{'p90 ms':>7}  {'err':>3}  {_spec_columns(None) + '  ' if spec else ''}name"
    lines = [head, "-" * len(head)]

    def row(label: str, b: Mapping[str, Any], name: str) -> str:
        extra = _spec_columns(b.get("speculative")) + "  " if spec else ""
        if b["n"] == 0:
            return (f"{label:>4}  {0:>3}  {'-':>4}  {'-':>6}  {'-':>13}  {'-':>6}  {'-':>7}  {'-':>7}  {0:>3}  "
                    f"{extra}{name}")
        ci = f"{100 * b['ci_low']:.1f}-{100 * b['ci_high']:.1f}"
        return (f"{label:>4}  {b['n']:>3}  {b['successes']:>4}  {100 * b['rate']:>5.1f}%  {ci:>13}  "
                f"{b['mean_steps']:>6.1f}  {_fmt_ms(b['latency_p50_ms']):>7}  {_fmt_ms(b['latency_p90_ms']):>7}  "
                f"{b['errors']:>3}  {extra}{name}")

    for tid, b in summary["per_task"].items():
        lines.append(row(tid, b, b.get("name", "")))
    lines.append("-" * len(head))
    lines.append(row("all", summary["overall"], ""))
    if summary.get("missing"):
        lines.append(f"({summary['missing']} requested episodes not run yet: rerun with --resume)")
    if spec:
        lines.extend(_spec_lines(summary["overall"]["speculative"]))
    return "\n".join(lines)


def _spec_columns(block: Mapping[str, Any] | None) -> str:
    """``acc`` (mean accepted draft layers) and ``greedy`` (chunks differing/checked) cells; the header for None."""
    if block is None:
        return f"{'acc':>5}  {'greedy':>11}"
    acc = block.get("mean_accepted_layers")
    checked = block.get("greedy_checked_chunks", 0)
    greedy = f"{block.get('greedy_mismatched_chunks', 0)}/{checked}" if checked else "-"
    return f"{_fmt_num(acc):>5}  {greedy:>11}"


def _spec_lines(block: Mapping[str, Any]) -> list[str]:
    rates = ", ".join(f"L{i} {'-' if r is None else format(100 * r, '.1f') + '%'} ({a}/{n})" for i, (r, a, n) in
                      enumerate(zip(block["layer_acceptance_rate"], block["layer_accepted"], block["layer_attempted"])))
    lines = [f"speculative: {block['chunks']} chunks, mean accepted draft layers "
             f"{_fmt_num(block['mean_accepted_layers'])}; acceptance per draft layer given the layers below: {rates}"]
    if block.get("greedy_checked_chunks"):
        lines.append(f"greedy check: {block['greedy_mismatched_chunks']} of {block['greedy_checked_chunks']} chunks "
                     f"differ from greedy decoding ({block['greedy_tokens_differing']} codes); policy latency "
                     f"without the check p50 {_fmt_ms(block.get('latency_without_check_p50_ms'))} ms, p90 "
                     f"{_fmt_ms(block.get('latency_without_check_p90_ms'))} ms")
    return lines


def _fmt_num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot_summary(summary: Mapping[str, Any], path: Path, title: str) -> None:
    """``summary.png``: success rate per task and overall with the Wilson intervals (written through a rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [(tid, b) for tid, b in summary["per_task"].items() if b["n"] > 0]
    rows = tasks + [("all", summary["overall"])] if tasks else []
    fig = Figure(figsize=(7.0, 0.35 * len(rows) + 1.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if rows:
        y = np.arange(len(rows))
        rates = np.array([100 * b["rate"] for _, b in rows])
        lo = rates - np.array([100 * b["ci_low"] for _, b in rows])
        hi = np.array([100 * b["ci_high"] for _, b in rows]) - rates
        colors = ["tab:blue"] * len(tasks) + ["tab:orange"]
        ax.barh(y, rates, xerr=np.stack([lo, hi]), color=colors, capsize=3, ecolor="black")
        ax.set_yticks(y, [f"task {t} ({b['successes']}/{b['n']})" if t != "all" else
                          f"all ({b['successes']}/{b['n']})" for t, b in rows])
        ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("success rate (%), Wilson 95% CI")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def versions() -> dict[str, str | None]:
    """Installed versions of rsd, torch, numpy, mujoco, robosuite and LIBERO (None where not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for label, dists in (("rsd", ("rsd",)), ("torch", ("torch",)), ("numpy", ("numpy",)), ("mujoco", ("mujoco",)),
                         ("robosuite", ("robosuite",)), ("libero", ("hf-libero", "libero"))):
        out[label] = None
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[label] = metadata.version(dist)
                break
    if out["rsd"] is None:  # running from a checkout without `pip install -e .`
        import rsd

        out["rsd"] = rsd.__version__
    return out


def protocol_block(max_steps: int, num_steps_wait: int, dummy_action: Sequence[float]) -> dict[str, Any]:
    """``summary.json``'s ``protocol`` block."""
    return {"max_steps": max_steps, "num_steps_wait": num_steps_wait, "dummy_action": list(dummy_action),
            "success": "done flag of env.step", "seeding": "random/numpy/torch seeded before every episode"}


def renderer_record(render: bool, episodes: Sequence[EpisodeResult] = ()) -> dict[str, Any]:
    """The headless GL backend the episodes rendered with and its GL vendor / renderer
    (``rsd.sim.setup.describe_renderer``, in this process: a pixel policy's success depends on them), and
    ``in_episodes``: the distinct ``"vendor / renderer"`` the workers recorded in ``episodes`` (EpisodeResults), which
    is what counts where the workers run elsewhere (a Ray cluster's nodes). ``mixed``: True when that is more than
    one: those episodes are not one measurement."""
    if not render:
        return {"backend": "none (--no-render)"}
    from rsd.sim.setup import describe_renderer

    info = describe_renderer()
    record: dict[str, Any] = {"backend": info.backend, "renderer": info.renderer, "vendor": info.vendor,
                              "source": info.source}
    if info.error:
        record["probe_error"] = info.error
    seen = sorted({r.renderer for r in episodes if r.renderer is not None})
    record["in_episodes"] = seen
    record["mixed"] = len(seen) > 1
    return record


def renderer_warning(record: Any) -> str | None:
    """The warning to print for a :func:`renderer_record` whose episodes came from several renderers (``mixed``)."""
    if not isinstance(record, dict) or not record.get("mixed"):
        return None
    seen = record["in_episodes"]
    return (f"WARNING: the episodes were rendered by {len(seen)} different GL renderers ({'; '.join(seen)}); a pixel "
            f"policy's results differ between renderers, so these are not one measurement: run the workers on one "
            f"kind of machine (summary.json 'renderer' records them).")

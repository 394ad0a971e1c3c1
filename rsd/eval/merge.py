"""Combine the run directories of the shards of one ``rsd eval`` request into one run.

    rsd merge OUT SHARD_DIR [SHARD_DIR ...] [--allow-missing]

Each SHARD_DIR is the ``--out`` of ``rsd eval ... --shard i/N`` (or ``OUT/shards/shard-i-of-N`` of
``rsd eval --backend slurm``). OUT receives what a single run of the whole request writes: ``episodes.jsonl`` (the
last record of every requested episode, in the canonical task-major order; video paths made relative to OUT),
``summary.json`` (the same blocks as a single run's, from ``rsd.eval.report.summarize``, plus ``merged``: the
shards it came from, and ``missing_episodes``), ``summary.png`` and ``run.json`` (the shards' common record with
``shard: null`` and the same ``merged`` block). ``scripts/compare_runs.py`` reads OUT like any run; ``rsd eval``
refuses to write into it (resume the shards, then merge again: the merge is deterministic and rewrites OUT).

Refused with :class:`rsd.errors.MergeError` (exit 1, nothing written): shards whose ``run.json`` differ in anything
the episodes depend on (``rsd.eval.rundir.RUN_KEYS``: policy content, device, protocol settings, decoding, ...), in
package versions (or a shard whose episodes ran under several), in the request (suite, tasks, trials) or the shard
count; the same shard index twice; the same episode recorded in two shards; a directory that is not a shard run.

Gaps are never dropped silently: a requested episode is *missing* when its shard is absent (no directory given, or
one that does not exist or holds no ``run.json`` yet: the shard never started), when its shard has not run it yet,
or when its last record ended with an error (that record is kept in ``episodes.jsonl`` and counted as in a single
run: ``errors``, ``complete: false``). Missing episodes are listed in ``summary.json`` (``missing_episodes``) and
printed; the exit code is then 3, unless ``--allow-missing`` (exit 0).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rsd.errors import ConfigError, MergeError
from rsd.eval.records import EpisodeKey, EpisodeResult, ResultsFile, latest_by_key
from rsd.eval.report import format_table, plot_summary, protocol_block, renderer_record, renderer_warning, summarize
from rsd.eval.rundir import (LOCK_NAME, MERGED_KEY, PLOT_NAME, RESULTS_NAME, RUN_KEY_DEFAULTS, RUN_KEY_LABELS,
                             RUN_KEYS, RUN_NAME, SUMMARY_NAME, is_run_dir, read_run_record, write_json_atomic)
from rsd.eval.shards import Shard, request_keys, shard_keys
from rsd.filelock import exclusive_lock
from rsd.sim import protocol

__all__ = ["HELP", "MISSING_EXIT", "ShardRun", "read_shard", "check_merge_out", "merge_runs", "add_arguments", "run"]

HELP = "combine the run directories of rsd eval --shard i/N into one run (episodes, summary, plot)"
MISSING_EXIT = 3  # merged, but requested episodes are missing (and --allow-missing was not given)


@dataclass(frozen=True)
class ShardRun:
    """One shard's run directory: its ``run.json``, shard, last record per episode and ``summary.json`` (if any)."""

    directory: Path
    record: Mapping[str, Any]
    shard: Shard
    results: Mapping[EpisodeKey, EpisodeResult]
    summary: Mapping[str, Any] | None

    @property
    def label(self) -> str:
        return f"shard {self.shard} ({self.directory})"


def read_shard(directory: str | Path) -> ShardRun | None:
    """The shard run in ``directory``; None when it is absent (no such directory, or one with nothing but rsd's
    lock: its eval never started). MergeError when it holds something that is not a shard run of rsd eval."""
    directory = Path(directory)
    if not directory.exists():
        return None
    if not directory.is_dir():
        raise MergeError(f"{directory} is a file, not a shard's run directory: pass the --out directories of "
                         f"rsd eval --shard i/N.")
    try:
        record = read_run_record(directory / RUN_NAME)
    except ConfigError as exc:
        raise MergeError(f"cannot merge {directory}: {exc}") from exc
    if record is None:
        if set(os.listdir(directory)) - {LOCK_NAME}:
            raise MergeError(f"{directory} holds no {RUN_NAME}: it is not the --out of rsd eval --shard i/N. Pass "
                             f"only shard run directories.")
        return None
    if MERGED_KEY in record:
        raise MergeError(f"{directory} is itself a merged run (rsd merge): pass the shard directories it was merged "
                         f"from (its {RUN_NAME} lists them).")
    if not is_run_dir(directory):
        raise MergeError(f"{directory / RUN_NAME} is not an rsd eval run record: pass the --out directories of "
                         f"rsd eval --shard i/N.")
    if record.get("shard") is None:
        raise MergeError(f"{directory} is a whole rsd eval run, not a shard (its {RUN_NAME} has no shard): merge only "
                         f"the --out directories of rsd eval --shard i/N.")
    shard = Shard.from_record(record["shard"], str(directory / RUN_NAME))
    request = record.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("tasks"), list):
        raise MergeError(f"{directory / RUN_NAME} records no resolved request (suite, tasks, trials): it was edited "
                         f"or written by another program; rerun that shard in a new --out.")
    try:
        results = latest_by_key(ResultsFile(directory / RESULTS_NAME).load())
    except ConfigError as exc:
        raise MergeError(f"cannot merge {directory}: {exc}") from exc
    summary_path, summary = directory / SUMMARY_NAME, None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MergeError(f"{summary_path} is not valid JSON ({exc}): rerun that shard with --resume to rewrite "
                             f"it, then merge.") from exc
    return ShardRun(directory, record, shard, results, summary)


def _recorded(record: Mapping[str, Any], key: str) -> Any:
    return record.get(key, RUN_KEY_DEFAULTS.get(key))


def _check_together(runs: Sequence[ShardRun]) -> None:
    """MergeError unless every shard belongs to the same run: same RUN_KEYS, versions, request and count, each
    index once, each episode in one shard only and in its own slice."""
    first = runs[0]
    seen: dict[int, ShardRun] = {}
    for run in runs:
        if run.shard.index in seen:
            raise MergeError(f"shard {run.shard} is given twice: {seen[run.shard.index].directory} and "
                             f"{run.directory}; pass each shard's directory once.")
        seen[run.shard.index] = run
        if run.shard.count != first.shard.count or run.record["request"] != first.record["request"]:
            raise MergeError(f"{run.label} is a slice of another request than {first.label}: "
                             f"{run.record['request']} in {run.shard.count} shards vs {first.record['request']} in "
                             f"{first.shard.count}; merge only the shards of one rsd eval request.")
        diffs = [f"{RUN_KEY_LABELS.get(k, k)}: {_recorded(first.record, k)!r} vs {_recorded(run.record, k)!r}"
                 for k in RUN_KEYS if _recorded(run.record, k) != _recorded(first.record, k)]
        if diffs:
            raise MergeError(f"{run.label} ran other settings than {first.label} ({'; '.join(diffs)}): its episodes "
                             f"are not the same experiment. Rerun that shard with the same policy files and settings "
                             f"in a new --out, then merge.")
        if run.record.get("versions_earlier"):
            raise MergeError(f"{run.label} was resumed under other package versions ({RUN_NAME} versions_earlier: "
                             f"{run.record['versions_earlier']}), so its episodes ran under several; rerun it in a "
                             f"new --out with one set of packages.")
        if "versions" not in run.record:
            raise MergeError(f"{run.directory / RUN_NAME} records no package versions (written by an older rsd): "
                             f"rerun that shard in a new --out.")
        if run.record["versions"] != first.record["versions"]:
            diff = {k: (first.record["versions"].get(k), v) for k, v in run.record["versions"].items()
                    if first.record["versions"].get(k) != v}
            raise MergeError(f"{run.label} ran under other package versions than {first.label} ({diff}); install the "
                             f"same versions everywhere and rerun the odd shards in new --out directories.")
    owner: dict[EpisodeKey, ShardRun] = {}
    for run in runs:
        for key in run.results:
            if key in owner:
                raise MergeError(f"{key.suite} task {key.task_id} trial {key.trial} is recorded in two shards: "
                                 f"{owner[key].label} and {run.label}; one of the directories was copied or edited. "
                                 f"Remove the stray one and merge again.")
            owner[key] = run
    keys = _request(first)
    for run in runs:
        own = set(shard_keys(keys, run.shard))
        foreign = sorted(k for k in run.results if k not in own)
        if foreign:
            k = foreign[0]
            raise MergeError(f"{run.label} records {len(foreign)} episode(s) outside its slice (first: task "
                             f"{k.task_id} trial {k.trial}): its episodes.jsonl was edited or copied from another "
                             f"run; rerun that shard in a new --out.")


def _request(run: ShardRun) -> list[EpisodeKey]:
    req = run.record["request"]
    return request_keys(req["suite"], req["tasks"], req["trials"])


def check_merge_out(out: Path, shard_dirs: Iterable[Path], *, also_allowed: Iterable[str] = ()) -> None:
    """MergeError unless ``out`` may receive the merge: new, empty (rsd's lock and ``also_allowed`` entries aside) or
    an earlier merge's output, and none of the shard directories."""
    if any(out.resolve() == Path(d).resolve() for d in shard_dirs):
        raise MergeError(f"OUT {out} is also one of the shard directories: pass a new directory for the merge.")
    if out.exists() and not out.is_dir():
        raise MergeError(f"OUT {out} is a file: pass a new directory for the merge.")
    if not out.is_dir():
        return
    entries = sorted(set(os.listdir(out)) - {LOCK_NAME, *also_allowed})
    if entries and MERGED_KEY not in ((read_run_record(out / RUN_NAME) or {}) if is_run_dir(out) else {}):
        raise MergeError(f"OUT {out} holds {', '.join(entries[:5])} and is not the output of an earlier rsd merge: "
                         f"rsd merge would overwrite its {RUN_NAME}, {SUMMARY_NAME} and {RESULTS_NAME}. Pass a new or "
                         f"empty directory.")


def _missing(keys: Sequence[EpisodeKey], count: int, by_index: Mapping[int, ShardRun]) -> list[dict[str, Any]]:
    missing = []
    for pos, key in enumerate(keys):
        run = by_index.get(pos % count)
        if run is None:
            reason = f"shard {pos % count}/{count} absent"
        elif key not in run.results:
            reason = f"not run yet by {run.label}"
        elif run.results[key].error is not None:
            reason = f"ended with an error in {run.label}: {run.results[key].error}"
        else:
            continue
        missing.append({"suite": key.suite, "task_id": key.task_id, "trial": key.trial, "reason": reason})
    return missing


def _one(values: Iterable[Any]) -> Any:
    """The common value, or the list of the distinct ones."""
    distinct: list[Any] = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    return distinct[0] if len(distinct) == 1 else distinct


def _merged_renderer(summaries: Sequence[dict], records: Sequence[EpisodeResult], render: bool) -> Any:
    """The shards' common renderer record (the distinct ones, as a list, where they differ), with ``in_episodes`` and
    ``mixed`` recomputed over the merged episodes (``rsd.eval.report.renderer_record``)."""
    if not summaries:
        return None if render else renderer_record(False)
    per_episode = ("in_episodes", "mixed")
    common = _one({k: v for k, v in (s.get("renderer") or {}).items() if k not in per_episode} for s in summaries)
    if render and isinstance(common, dict):
        seen = sorted({r.renderer for r in records if r.renderer is not None})
        common = {**common, "in_episodes": seen, "mixed": len(seen) > 1}
    return common


def merge_runs(out: str | Path, shard_dirs: Sequence[str | Path], *, command: str = "", plot: bool = True,
               also_allowed: Iterable[str] = ()) -> dict[str, Any]:
    """Merge ``shard_dirs`` into ``out`` and return the merged summary (``missing_episodes`` lists the gaps)."""
    t0 = time.perf_counter()
    out, dirs = Path(out), [Path(d) for d in shard_dirs]
    check_merge_out(out, dirs, also_allowed=also_allowed)
    runs = [r for r in (read_shard(d) for d in dirs) if r is not None]
    if not runs:
        raise MergeError(f"none of {', '.join(map(str, dirs))} holds a shard run yet (no {RUN_NAME}): run the shards "
                         f"(rsd eval --shard i/N --out DIR) first.")
    _check_together(runs)
    first, count = runs[0], runs[0].shard.count
    by_index = {r.shard.index: r for r in runs}
    keys = _request(first)
    owner = {k: by_index[pos % count] for pos, k in enumerate(keys) if pos % count in by_index}
    records = [_relocated(owner[k].results[k], owner[k].directory, out) for k in keys
               if k in owner and k in owner[k].results]
    rec = first.record
    shards = [{"index": r.shard.index, "count": count, "dir": str(r.directory), "backend": r.record.get("backend"),
               "episodes": len(r.results)} for r in sorted(runs, key=lambda r: r.shard)]
    merged = {"shards": shards, "absent_shards": [i for i in range(count) if i not in by_index]}
    summaries = [r.summary for r in runs if r.summary is not None]
    summary = summarize(records, keys)
    summary.update({
        "suite": rec["suite"], "policy": rec["policy"], "seed": rec["seed"], "render": rec["render"],
        "camera_size": rec["camera_size"], "fast": _recorded(rec, "fast"),
        "decode": summaries[0]["decode"] if summaries else {"mode": _recorded(rec, "decode"),
                                                            "threshold": _recorded(rec, "decode_threshold"),
                                                            "check_greedy": _recorded(rec, "check_greedy")},
        "center_crop": rec.get("policy_center_crop"), "trials": rec["request"]["trials"],
        "tasks": rec["request"]["tasks"], "shard": None, "backend": _one(r.record.get("backend") for r in runs),
        "protocol": protocol_block(rec["max_steps"], rec["num_steps_wait"], protocol.DUMMY_ACTION),
        "renderer": _merged_renderer(summaries, records, rec["render"]),
        "versions": rec["versions"], "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "wall_s": time.perf_counter() - t0, "episodes_this_run": 0,
        "episode_wall_s_total": float(sum(r.wall_s for r in records)),
        MERGED_KEY: merged, "missing_episodes": _missing(keys, count, by_index),
    })
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / LOCK_NAME, what=f"rsd merge is to write {out}",
                        fix="wait for that process to finish, or choose another OUT."):
        _write_lines(out / RESULTS_NAME, records)
        write_json_atomic(out / RUN_NAME, {**rec, "shard": None, "backend": summary["backend"], MERGED_KEY: merged,
                                           "command": command})
        write_json_atomic(out / SUMMARY_NAME, summary)
        if plot:
            title = f"{rec['suite']} · {rec['policy']} · seed {rec['seed']} · {len(runs)} of {count} shards merged"
            plot_summary(summary, out / PLOT_NAME, title)
    return summary


def _relocated(result: EpisodeResult, shard_dir: Path, out: Path) -> EpisodeResult:
    """``result`` with its video path (relative to its shard's directory) made relative to ``out``."""
    if result.video is None:
        return result
    return replace(result, video=os.path.relpath(shard_dir / result.video, out))


def _write_lines(path: Path, records: Sequence[EpisodeResult]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(r.to_json() + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def format_missing(missing: Sequence[Mapping[str, Any]]) -> str:
    """The missing episodes, one line per task and reason: ``libero_spatial task 3 trials 0, 2: shard 1/2 absent``."""
    groups: dict[tuple[str, int, str], list[int]] = {}
    for m in missing:
        groups.setdefault((m["suite"], m["task_id"], m["reason"]), []).append(m["trial"])
    lines = [f"{suite} task {task} trial{'s' if len(trials) > 1 else ''} {', '.join(map(str, trials))}: {reason}"
             for (suite, task, reason), trials in groups.items()]
    return "\n".join(lines)


def report(summary: Mapping[str, Any], out: Path, *, allow_missing: bool) -> int:
    """Print the table and the missing episodes; the exit code (0, or :data:`MISSING_EXIT`)."""
    print(format_table(summary))
    mixed = renderer_warning(summary["renderer"])
    if mixed:
        print(f"rsd merge: {mixed}", file=sys.stderr)
    missing = summary["missing_episodes"]
    print(f"wrote {out / SUMMARY_NAME}, {out / RUN_NAME} and {out / RESULTS_NAME} "
          f"({summary['overall']['n']} episodes from {len(summary[MERGED_KEY]['shards'])} of "
          f"{summary[MERGED_KEY]['shards'][0]['count']} shards)")
    if not missing:
        return 0
    print(f"rsd merge: {len(missing)} of {summary['overall']['requested']} requested episodes are missing "
          f"(listed in {out / SUMMARY_NAME} missing_episodes):\n{format_missing(missing)}\n"
          f"Resume the shards (rsd eval ... --shard i/N --resume --out SHARD_DIR) and merge again"
          f"{'' if allow_missing else f'; exit code {MISSING_EXIT} (--allow-missing: 0)'}.", file=sys.stderr)
    return 0 if allow_missing else MISSING_EXIT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (f"exit codes: 0 merged, nothing missing (or --allow-missing); 1 refused (a typed error says "
                     f"why; nothing written); {MISSING_EXIT} merged, but requested episodes are missing (listed).")
    parser.add_argument("out", metavar="OUT", help="directory of the merged run: new, empty, or an earlier merge's")
    parser.add_argument("shard_dirs", nargs="+", metavar="SHARD_DIR",
                        help="the --out directories of rsd eval --shard i/N (e.g. OUT/shards/shard-*-of-N of "
                             "--backend slurm); a directory that does not exist yet counts as an absent shard")
    parser.add_argument("--allow-missing", action="store_true",
                        help=f"exit 0 even when episodes are missing (they are still listed); default exit "
                             f"{MISSING_EXIT}")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="do not write summary.png")


def run(args: argparse.Namespace) -> int:
    summary = merge_runs(args.out, args.shard_dirs, command=shlex.join(["rsd", *sys.argv[1:]]), plot=args.plot)
    return report(summary, Path(args.out), allow_missing=args.allow_missing)

"""The results directory of ``rsd eval``: which directories it may write, and its ``run.json``.

An ``--out`` is accepted when it does not exist, is empty (rsd's ``.lock`` aside) or holds the ``run.json`` of an
earlier rsd eval (:func:`is_run_dir`); any other directory is refused before anything is written into it
(:func:`check_out_dir`), so a user's own ``summary.json`` & co. are never overwritten.

``run.json`` records what the episodes depend on (``rsd.eval.evaluation.EvalConfig.run_record``).
:func:`check_run_record` refuses a ``--resume`` whose record differs (:class:`ResumeMismatchError`, naming each
difference), once an episode is recorded; :class:`RunRecordWriter` writes the record once the run has started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from rsd.errors import ConfigError, ResumeMismatchError

__all__ = ["RESULTS_NAME", "RUN_NAME", "SUMMARY_NAME", "PLOT_NAME", "LOCK_NAME", "RUN_KEYS", "MERGED_KEY", "is_run_dir",
           "read_run_record", "check_out_dir", "prepare_out_dir", "check_run_record", "carry_versions",
           "RunRecordWriter", "write_json_atomic"]

RESULTS_NAME = "episodes.jsonl"
RUN_NAME = "run.json"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "summary.png"
LOCK_NAME = ".lock"
# run.json keys the recorded episodes depend on (their outcome; for fast, their latencies): --resume matches them all
RUN_KEYS = ("suite", "policy_kind", "policy_unnorm_key", "policy_content", "device", "seed", "render", "camera_size",
            "max_steps", "num_steps_wait", "fast", "policy_center_crop", "decode", "decode_threshold", "check_greedy")
# Not in RUN_KEYS, on purpose:
# - "backend": who ran the episodes (local, batched, ray, slurm) changes no outcome; a run may be resumed with another
#   backend.
# - "versions" (rsd, torch, numpy, mujoco, robosuite, libero): a resume after an upgrade stays possible (run.json
#   files written before versions were recorded have none, and rsd's own version moves with every release, which
#   would strand long runs); instead carry_versions keeps every earlier set under "versions_earlier", so the record
#   shows a run whose episodes ran under different packages, and rsd merge refuses such shards and shards whose
#   versions differ.
# - "shard" and "request" (rsd.eval.shards) bind only a sharded run: check_run_record compares them when either the
#   recorded or the wanted run is a shard (an unsharded run may be resumed with more --trials or --tasks).
# what a run.json written before a key existed meant by its absence
RUN_KEY_DEFAULTS: dict[str, Any] = {"fast": False, "decode": "saved", "decode_threshold": None, "check_greedy": False}
# how a --resume refusal names a key
RUN_KEY_LABELS = {"policy_kind": "policy kind", "policy_unnorm_key": "policy statistics key (@KEY)",
                  "policy_content": "policy content (hash of the files behind --policy)", "device": "device (--device)",
                  "policy_center_crop": "OpenVLA-OFT centre crop (--no-center-crop)", "decode": "decoding (--decode)",
                  "decode_threshold": "acceptance threshold (--threshold)",
                  "check_greedy": "greedy check (--check-greedy)"}
# keys every run.json of rsd eval has held: what makes a directory an rsd eval run (is_run_dir)
RUN_MARKERS = ("suite", "policy", "seed", "max_steps", "num_steps_wait")
# the run.json key of a directory written by rsd merge (rsd.eval.merge): rsd eval never writes into one
MERGED_KEY = "merged"
SLICE_LABELS = {"shard": "shard (--shard)", "request": "request the shard is a slice of (--suite/--tasks/--trials)"}


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` by ``data`` as indented JSON, through ``<path>.partial`` and a rename."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_run_record(path: Path) -> dict[str, Any] | None:
    """``run.json`` as a dict, or None when it does not exist; ConfigError when it is not one rsd wrote."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): it was edited or cut; remove it to start over, or "
                          f"choose another --out.") from exc
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not an rsd eval run record (a JSON object); choose another --out.")
    return saved


def is_run_dir(directory: Path) -> bool:
    """Whether ``directory`` holds the ``run.json`` of an rsd eval (a JSON object with rsd's marker keys)."""
    try:
        saved = read_run_record(Path(directory) / RUN_NAME)
    except ConfigError:
        return False
    return saved is not None and all(k in saved for k in RUN_MARKERS)


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that exists but is not a directory, or is a directory that is neither empty (rsd's
    ``.lock`` aside) nor an rsd eval run: rsd would overwrite its ``summary.json``, ``run.json``, ..."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory: pass a new directory for the results.")
    if not out.is_dir():
        return
    entries = sorted(set(os.listdir(out)) - {LOCK_NAME})
    if is_run_dir(out) and MERGED_KEY in (read_run_record(out / RUN_NAME) or {}):
        raise ConfigError(f"--out {out} was written by rsd merge (the merge of shard runs): rsd eval does not write "
                          f"into it. Resume the shard directories listed in its {RUN_NAME} (rsd eval --shard i/N "
                          f"--resume --out SHARD_DIR) and merge them again (rsd merge), or choose another --out.")
    if entries and not is_run_dir(out):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"--out {out} is an existing directory that is not an rsd eval run (it holds {shown} and "
                          f"no {RUN_NAME} of rsd eval): rsd eval would overwrite its {SUMMARY_NAME}, {RUN_NAME}, "
                          f"{PLOT_NAME} and {RESULTS_NAME}. Pass a new or empty directory.")


def prepare_out_dir(out: Path) -> None:
    """:func:`check_out_dir`, then create ``out`` (and its parents); ConfigError naming the fix when it cannot be
    created or written to."""
    check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out} ({exc.strerror}): pass a directory you can write to.") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to --out {out} (permission denied): pass a directory you can write to.")


def check_run_record(path: Path, wanted: Mapping[str, Any], *, resume: bool, has_records: bool) -> None:
    """On ``--resume`` of a run with recorded episodes: ResumeMismatchError naming every key of ``wanted`` that
    differs from ``run.json``. A run.json with no episode recorded binds nothing (its start failed or was cut)."""
    saved = read_run_record(path)
    if not (resume and has_records and saved is not None):
        return
    recorded = {k: saved.get(k, RUN_KEY_DEFAULTS.get(k)) for k in RUN_KEYS}
    absent = [k for k in RUN_KEYS if k not in saved and k not in RUN_KEY_DEFAULTS]
    if absent:
        raise ResumeMismatchError(
            f"{path} records no {', '.join(RUN_KEY_LABELS.get(k, k) for k in absent)} (written by an older rsd), "
            f"so --resume cannot prove that the recorded episodes ran the same policy on the same device; run the "
            f"eval again in another --out.")
    diffs = {RUN_KEY_LABELS.get(k, k): (recorded[k], wanted[k]) for k in RUN_KEYS if recorded[k] != wanted[k]}
    if saved.get("shard") is not None or wanted.get("shard") is not None:  # a shard resumes only as itself
        diffs.update({SLICE_LABELS[k]: (saved.get(k), wanted.get(k)) for k in SLICE_LABELS
                      if saved.get(k) != wanted.get(k)})
    if diffs:
        listed = "; ".join(f"{label}: recorded {a!r} vs now {b!r}" for label, (a, b) in diffs.items())
        raise ResumeMismatchError(
            f"--resume with a policy or settings that differ from the run recorded in {path.parent} ({listed}); "
            f"resume with the same policy files, device and settings, or choose another --out.")


def carry_versions(path: Path, wanted: Mapping[str, Any], *, has_records: bool) -> dict[str, Any]:
    """``wanted`` with the package versions of earlier sessions kept: when the episodes already recorded in
    ``path``'s run ran under other ``versions``, those go to ``versions_earlier`` (a list, oldest first)."""
    saved = read_run_record(path) if has_records else None
    record = dict(wanted)
    if saved is None:
        return record
    earlier = list(saved.get("versions_earlier") or [])
    if "versions" in saved and saved["versions"] != wanted["versions"] and saved["versions"] not in earlier:
        earlier.append(saved["versions"])
    if earlier:
        record["versions_earlier"] = earlier
    return record


class RunRecordWriter:
    """Writes ``run.json`` once, when the eval's start succeeded (or its first episode is recorded)."""

    def __init__(self, path: Path, record: Mapping[str, Any]) -> None:
        self.path, self.record, self.written = path, dict(record), False

    def __call__(self) -> None:
        if not self.written:
            write_json_atomic(self.path, self.record)
            self.written = True

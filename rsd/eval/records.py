"""What ``rsd eval`` records: one :class:`EpisodeResult` per episode, appended to ``episodes.jsonl``.

:class:`ResultsFile` appends each record as one ``write`` of the whole line + ``fsync`` (a kill loses at most the
episodes in flight; a torn last line is dropped on load and cut before appending resumes); :func:`latest_by_key`
counts every (suite, task, trial) once, from its last record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from rsd.errors import ConfigError
from rsd.eval.decoding import SpecTally

__all__ = ["EpisodeKey", "EpisodeResult", "ResultsFile", "latest_by_key"]


@dataclass(frozen=True, order=True)
class EpisodeKey:
    """One episode of the protocol: trial ``trial`` of task ``task_id`` starts from init state ``trial``."""

    suite: str
    task_id: int
    trial: int

    @property
    def init_state_index(self) -> int:
        return self.trial


@dataclass(frozen=True)
class EpisodeResult:
    """One line of ``episodes.jsonl``. ``steps`` counts policy actions executed (settle steps excluded).
    ``speculative``: how an RSD policy decoded speculatively in the episode (``rsd.eval.decoding.SpecTally``; None for
    other policies and in lines of runs recorded before it existed). ``renderer``: ``"vendor / renderer"`` of the GL
    context the episode's frames came from, as the process that ran it saw it (None when unrendered, and in lines of
    runs recorded before it existed): a pixel policy's success depends on it."""

    suite: str
    task_id: int
    task_name: str
    instruction: str
    trial: int
    init_state_index: int
    success: bool
    steps: int
    error: str | None  # None, or "Type: message"
    latency_p50_ms: float | None  # policy latency per chunk (predict_chunk wall clock)
    latency_p90_ms: float | None
    chunk_latencies_ms: tuple[float, ...]
    wall_s: float
    video: str | None  # relative to the eval dir
    seed: int
    traceback: str | None = None
    speculative: SpecTally | None = None
    renderer: str | None = None

    @property
    def key(self) -> EpisodeKey:
        return EpisodeKey(self.suite, self.task_id, self.trial)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["chunk_latencies_ms"] = [round(x, 4) for x in self.chunk_latencies_ms]
        data["speculative"] = None if self.speculative is None else self.speculative.to_dict()
        return json.dumps(data, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EpisodeResult":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"episode record lacks {missing}.")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["chunk_latencies_ms"] = tuple(float(x) for x in kwargs["chunk_latencies_ms"])
        if kwargs.get("speculative") is not None:
            if not isinstance(kwargs["speculative"], Mapping):
                raise ConfigError(f"episode record's speculative is {kwargs['speculative']!r}, not an object.")
            kwargs["speculative"] = SpecTally.from_dict(kwargs["speculative"])
        return cls(**kwargs)


class ResultsFile:
    """``DIR/episodes.jsonl``: append-only, one complete JSON line per episode, crash-safe.

    Each append is one ``os.write`` of the whole line on an ``O_APPEND`` descriptor followed by ``fsync``, so
    a kill leaves either the full line or (at worst, for a write cut mid-way) a last line without its
    newline, which :meth:`load` drops (``repair=True`` also truncates it away before appending resumes).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists_nonempty(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def load(self, *, repair: bool = False) -> list[EpisodeResult]:
        """All records in file order. A torn last line (no trailing newline) is ignored (and cut if ``repair``)."""
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        complete_len = raw.rfind(b"\n") + 1
        torn = raw[complete_len:]
        if torn.strip():
            print(f"rsd eval: ignoring a torn last line in {self.path} ({len(torn)} bytes: an episode whose "
                  f"write was cut by a kill; it will be re-run)", file=sys.stderr)
            if repair:
                with open(self.path, "r+b") as f:
                    f.truncate(complete_len)
                    f.flush()
                    os.fsync(f.fileno())
        records = []
        for lineno, raw_line in enumerate(raw[:complete_len].split(b"\n")[:-1], start=1):
            if not raw_line.strip():
                continue
            try:
                records.append(EpisodeResult.from_dict(json.loads(raw_line.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError, ConfigError, TypeError) as exc:
                raise ConfigError(f"{self.path}:{lineno} is not a valid episode record ({exc}); the file was edited "
                                  f"or written by another program. Fix or remove that line, or use another --out."
                                  ) from exc
        return records

    def append(self, result: EpisodeResult) -> None:
        line = (result.to_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # regular files on local disks write everything at once
                raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)


def latest_by_key(records: Sequence[EpisodeResult]) -> dict[EpisodeKey, EpisodeResult]:
    """The last record of every (suite, task, trial): an errored episode re-run by --resume is counted once."""
    out: dict[EpisodeKey, EpisodeResult] = {}
    for r in records:
        out[r.key] = r
    return out

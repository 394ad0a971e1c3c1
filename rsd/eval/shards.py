"""Shards of one ``rsd eval`` request: ``--shard i/N`` runs a deterministic, disjoint slice of its episodes.

The unit of work is one episode, (suite, task, trial). :func:`request_keys` lists the requested episodes in the
canonical task-major order (every trial of the first task, then the next task); shard ``i`` of ``N`` takes the
keys at the positions ``p`` with ``p % N == i`` (round-robin, so every shard gets a similar mix of tasks and a
similar amount of work). The ``N`` shards of one request cover every requested episode exactly once.

A shard runs into its own ``--out``; its ``run.json`` records the shard (:meth:`Shard.record`) and the whole
request (:func:`request_record`), which ``--resume`` and ``rsd merge`` (``rsd.eval.merge``) compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from rsd.errors import ConfigError
from rsd.eval.records import EpisodeKey

__all__ = ["Shard", "parse_shard", "shard_keys", "request_keys", "request_record", "shard_dir_name"]

_SHARD_FIX = "pass --shard INDEX/COUNT with 0 <= INDEX < COUNT, e.g. --shard 0/4 for the first of four shards"


@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or isinstance(self.count, bool) or not (
                isinstance(self.index, int) and isinstance(self.count, int)):
            raise ConfigError(f"a shard's index and count are integers, got {self.index!r}/{self.count!r}: "
                              f"{_SHARD_FIX}.")
        if self.count < 1:
            raise ConfigError(f"--shard {self.index}/{self.count}: the shard count must be >= 1; {_SHARD_FIX}.")
        if not 0 <= self.index < self.count:
            raise ConfigError(f"--shard {self.index}/{self.count}: the index is 0-based and must be below the count "
                              f"(0..{self.count - 1}); {_SHARD_FIX}.")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def record(self) -> dict[str, int]:
        """What ``run.json`` records under ``shard``."""
        return {"index": self.index, "count": self.count}

    @classmethod
    def from_record(cls, data: Any, where: str) -> "Shard":
        """A shard from its ``run.json`` record; ConfigError naming ``where`` when it is not one."""
        if not isinstance(data, Mapping) or set(data) != {"index", "count"}:
            raise ConfigError(f"{where}: 'shard' is {data!r}, not {{'index': I, 'count': N}}; the file was edited "
                              f"or written by another program.")
        return cls(data["index"], data["count"])


def parse_shard(text: str) -> Shard:
    """``"1/4"`` -> ``Shard(1, 4)``; ConfigError saying what to pass otherwise."""
    index, sep, count = str(text).strip().partition("/")
    try:
        if not sep:
            raise ValueError
        parsed = (int(index), int(count))
    except ValueError:
        raise ConfigError(f"--shard takes INDEX/COUNT, got {text!r}: {_SHARD_FIX}.") from None
    return Shard(*parsed)


def request_keys(suite: str, task_ids: Sequence[int], trials: int) -> list[EpisodeKey]:
    """The requested episodes in canonical (task-major) order."""
    return [EpisodeKey(suite, int(t), i) for t in task_ids for i in range(trials)]


def shard_keys(keys: Sequence[EpisodeKey], shard: Shard | None) -> list[EpisodeKey]:
    """The keys of ``shard`` (round-robin over the canonical list ``keys``); all of them for None."""
    return list(keys) if shard is None else list(keys[shard.index::shard.count])


def request_record(suite: str, task_ids: Sequence[int] | None, trials: int) -> dict[str, Any]:
    """What ``run.json`` records under ``request``: the whole request a shard is a slice of (``tasks`` None: every
    task of the suite, not yet resolved)."""
    return {"suite": suite, "tasks": None if task_ids is None else [int(t) for t in task_ids], "trials": int(trials)}


def shard_dir_name(shard: Shard) -> str:
    """``shard-<i>-of-<N>``: the shard directories of ``rsd eval --backend slurm`` (``OUT/shards/...``)."""
    return f"shard-{shard.index}-of-{shard.count}"

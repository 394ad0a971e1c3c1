"""What ``rsd eval`` records about how an RSD policy decoded: speculative acceptance and the greedy check.

Per episode (:class:`SpecTally`, the ``speculative`` field of an ``episodes.jsonl`` line; absent for policies that do
not decode speculatively and in lines of older runs), from each chunk's ``info`` (``rsd.policy.learned.RSDPolicy``):

- ``chunks``                 chunks decoded speculatively (``info["spec_stats"]``)
- ``accepted_layers_sum``    draft layers accepted, summed over the chunks (``mean_accepted_layers`` = sum / chunks)
- ``layer_accepted[l]``      chunks whose accepted prefix includes draft layer ``l``
- ``layer_attempted[l]``     chunks in which every draft layer below ``l`` was accepted, so ``l`` was judged on its
                             own (``layer_attempted[0]`` = chunks): ``accepted / attempted`` is the acceptance rate of
                             layer ``l`` given the layers below it
- ``greedy_checked``         chunks also decoded greedily and compared (``--check-greedy``, ``info["greedy_check"]``)
- ``greedy_mismatched``      of those, chunks whose codes differ from greedy (for ``exact`` the chunk that raised)
- ``greedy_tokens_differing`` codes that differ, summed
- ``greedy_check_ms``        per chunk, the time of the check (inside the measured policy latency; the summary also
                             gives the latency without it)

:class:`RecordingPolicy` wraps a policy in an episode worker and builds the tally; :func:`summarize_spec` aggregates
tallies of many episodes (``summary.json``'s ``speculative`` block, per task and overall).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from rsd.stats import percentiles

__all__ = ["SpecTally", "RecordingPolicy", "summarize_spec"]


@dataclass(frozen=True)
class SpecTally:
    """One episode's speculative decoding statistics (see the module docstring)."""

    chunks: int = 0
    accepted_layers_sum: int = 0
    layer_accepted: tuple[int, ...] = ()
    layer_attempted: tuple[int, ...] = ()
    greedy_checked: int = 0
    greedy_mismatched: int = 0
    greedy_tokens_differing: int = 0
    greedy_check_ms: tuple[float, ...] = ()

    @property
    def mean_accepted_layers(self) -> float | None:
        return self.accepted_layers_sum / self.chunks if self.chunks else None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("layer_accepted", "layer_attempted"):
            data[key] = list(data[key])
        data["greedy_check_ms"] = [round(x, 4) for x in self.greedy_check_ms]
        data["mean_accepted_layers"] = self.mean_accepted_layers
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SpecTally":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        for key in ("layer_accepted", "layer_attempted"):
            kw[key] = tuple(int(x) for x in kw.get(key, ()))
        kw["greedy_check_ms"] = tuple(float(x) for x in kw.get("greedy_check_ms", ()))
        return cls(**kw)


class _Builder:
    def __init__(self) -> None:
        self.chunks = self.accepted = self.checked = self.mismatched = self.differing = 0
        self.layer_accepted: list[int] = []
        self.layer_attempted: list[int] = []
        self.check_ms: list[float] = []

    def add(self, info: Mapping[str, Any]) -> None:
        stats = info.get("spec_stats")
        if stats is not None:
            k = len(stats["acceptance_rate"])
            if not self.layer_accepted:
                self.layer_accepted, self.layer_attempted = [0] * k, [0] * k
            for a in stats["accepted_layers"]:  # one per batch element: one per chunk here
                self.chunks += 1
                self.accepted += int(a)
                for layer in range(k):
                    self.layer_accepted[layer] += int(a > layer)
                    self.layer_attempted[layer] += int(a >= layer)
        check = info.get("greedy_check")
        if check is not None:
            self.add_check(check)
            self.check_ms.append(float(info.get("timing_ms", {}).get("greedy_check_ms", 0.0)))

    def add_check(self, check: Mapping[str, Any]) -> None:
        self.checked += int(check.get("chunks", 1))
        self.mismatched += int(not check.get("codes_equal", False))
        self.differing += int(check.get("tokens_differing", 0))

    def tally(self) -> SpecTally | None:
        if not (self.chunks or self.checked):
            return None
        return SpecTally(chunks=self.chunks, accepted_layers_sum=self.accepted,
                         layer_accepted=tuple(self.layer_accepted), layer_attempted=tuple(self.layer_attempted),
                         greedy_checked=self.checked, greedy_mismatched=self.mismatched,
                         greedy_tokens_differing=self.differing, greedy_check_ms=tuple(self.check_ms))


class RecordingPolicy:
    """A policy as the episode loop sees it, tallying each chunk's ``info`` (:meth:`tally` after the episode). A
    chunk refused by the greedy check (``SpeculativeMismatchError`` as the cause of the policy's error, carrying its
    ``check``) is counted as checked and mismatched before the error goes on."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self._builder = _Builder()

    def reset(self) -> None:
        self.policy.reset()

    def predict_chunk(self, observation: Any, instruction: str) -> Any:
        try:
            chunk = self.policy.predict_chunk(observation, instruction)
        except Exception as exc:
            check = getattr(exc.__cause__, "check", None) or getattr(exc, "check", None)
            if isinstance(check, Mapping):
                self._builder.add_check(check)
            raise
        info = getattr(chunk, "info", None)
        if isinstance(info, Mapping):
            self._builder.add(info)
        return chunk

    def tally(self) -> SpecTally | None:
        return self._builder.tally()


def _net_latencies(records: Sequence[Any]) -> list[float]:
    """Per chunk, the policy latency without the greedy check (episodes whose every chunk was checked)."""
    out: list[float] = []
    for r in records:
        spec = r.speculative
        if spec is not None and spec.greedy_check_ms and len(spec.greedy_check_ms) == len(r.chunk_latencies_ms):
            out.extend(lat - chk for lat, chk in zip(r.chunk_latencies_ms, spec.greedy_check_ms))
    return out


def summarize_spec(records: Sequence[Any]) -> dict[str, Any] | None:
    """The ``speculative`` block of a summary over episode records (``EpisodeResult``), None when none decoded
    speculatively: chunks, mean_accepted_layers (over chunks), layer_accepted / layer_attempted / layer_acceptance_rate
    (per draft layer), greedy_checked_chunks, greedy_mismatched_chunks, greedy_tokens_differing, and with the check
    latency_without_check_p50_ms / _p90_ms."""
    tallies = [r.speculative for r in records if getattr(r, "speculative", None) is not None]
    if not tallies:
        return None
    k = max(len(t.layer_accepted) for t in tallies)
    accepted, attempted = [0] * k, [0] * k
    for t in tallies:
        for layer, (a, n) in enumerate(zip(t.layer_accepted, t.layer_attempted)):
            accepted[layer] += a
            attempted[layer] += n
    chunks = sum(t.chunks for t in tallies)
    block: dict[str, Any] = {
        "chunks": chunks,
        "mean_accepted_layers": sum(t.accepted_layers_sum for t in tallies) / chunks if chunks else None,
        "layer_accepted": accepted, "layer_attempted": attempted,
        "layer_acceptance_rate": [a / n if n else None for a, n in zip(accepted, attempted)],
        "greedy_checked_chunks": sum(t.greedy_checked for t in tallies),
        "greedy_mismatched_chunks": sum(t.greedy_mismatched for t in tallies),
        "greedy_tokens_differing": sum(t.greedy_tokens_differing for t in tallies),
    }
    net = _net_latencies(records)
    if net:
        lat = percentiles(net)
        block["latency_without_check_p50_ms"], block["latency_without_check_p90_ms"] = lat["p50"], lat["p90"]
    return block

"""How a saved RSD policy decodes in ``rsd eval``: ``--decode``, ``--threshold``, ``--check-greedy``, resolved and
checked before anything loads (:func:`resolve_decode` -> :class:`DecodeChoice`).

``--decode``:

- ``saved``       as the policy was saved (the default; any policy);
- ``greedy``      the RFSQ head alone, layer by layer (``rsd.speculative.greedy_decode``);
- ``exact`` / ``relaxed`` / ``match_rate``  speculative decoding with the policy's draft head and that acceptance
  rule (``rsd.speculative.SpeculativeDecoder``); ``--threshold``: levels (an int >= 0) for ``relaxed`` (needed),
  a fraction in [0, 1] for ``match_rate`` (default 0.7, recorded resolved).

``--check-greedy`` (``rsd.policy.greedy_check``): every speculative chunk is also decoded greedily and compared; on
by default for ``--decode exact`` (a mismatch is a :class:`rsd.errors.SpeculativeMismatchError`), allowed for any
speculative decoding (``relaxed``/``match_rate`` count the differences). Everything but ``--decode saved`` applies
to RSD policies only (a directory saved by ``RSDPolicy``); a speculative mode needs the policy's draft head. Each
refusal is a :class:`ConfigError` saying what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsd.errors import ConfigError
from rsd.policy.packaged import resolve_packaged

__all__ = ["DECODE_MODES", "SPECULATIVE_MODES", "DecodeChoice", "resolve_decode"]

SPECULATIVE_MODES = ("exact", "relaxed", "match_rate")  # rsd.speculative.MODES (that module imports torch)
DECODE_MODES = ("saved", "greedy", *SPECULATIVE_MODES)


@dataclass(frozen=True)
class DecodeChoice:
    """A resolved ``--decode``: ``mode`` as asked, ``threshold`` resolved (match_rate's default filled in),
    ``check_greedy`` resolved, and ``effective``: how the policy will decode (greedy or a speculative mode; None
    for a policy that is not RSD) with ``effective_threshold``."""

    mode: str = "saved"
    threshold: float | int | None = None
    check_greedy: bool = False
    effective: str | None = None
    effective_threshold: float | int | None = None

    @property
    def speculative(self) -> bool | None:
        """The ``speculative`` override for ``RSDPolicy.from_pretrained`` (None: as saved)."""
        return None if self.mode == "saved" else self.mode != "greedy"

    def overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``RSDPolicy.from_pretrained``."""
        kw: dict[str, Any] = {"check_greedy": self.check_greedy}
        if self.mode != "saved":
            kw["speculative"] = self.speculative
        if self.mode in SPECULATIVE_MODES:
            kw.update(mode=self.mode, threshold=self.threshold)
        return kw

    def record(self) -> dict[str, Any]:
        """What ``run.json`` records (and ``--resume`` compares)."""
        return {"decode": self.mode, "decode_threshold": self.threshold, "check_greedy": self.check_greedy}

    def summary(self) -> dict[str, Any]:
        """``summary.json``'s ``decode`` block."""
        return {"mode": self.mode, "threshold": self.threshold, "check_greedy": self.check_greedy,
                "effective": self.effective, "effective_threshold": self.effective_threshold}


def _threshold(mode: str, threshold: Any) -> float | int | None:
    if mode not in ("relaxed", "match_rate"):
        if threshold is not None:
            raise ConfigError(f"--threshold applies to --decode relaxed (levels) or match_rate (a fraction); "
                              f"--decode {mode} takes none: drop --threshold.")
        return None
    from rsd.speculative import SpeculativeDecoder

    try:
        return SpeculativeDecoder._resolve_threshold(mode, threshold)
    except ConfigError as exc:
        raise ConfigError(f"--decode {mode} --threshold: {exc}") from exc


def _saved_rsd_meta(spec: str) -> dict[str, Any] | None:
    """``policy.json`` of a saved policy directory, None for any other spec."""
    directory = Path(resolve_packaged(spec))
    if not (directory.is_dir() and (directory / "policy.json").is_file()):
        return None
    from rsd.policy.learned import read_policy_meta  # torch: only for a saved policy (the CLI imports this module)

    return read_policy_meta(directory)


def resolve_decode(spec: str, mode: str = "saved", threshold: float | int | None = None,
                   check_greedy: bool | None = None) -> DecodeChoice:
    """Check ``--decode MODE [--threshold T] [--(no-)check-greedy]`` against the policy ``spec`` (reading only its
    ``policy.json``) and resolve it. ConfigError saying what to change for a choice that cannot apply."""
    if mode not in DECODE_MODES:
        raise ConfigError(f"--decode {mode!r}: choose one of {', '.join(DECODE_MODES)}.")
    threshold = _threshold(mode, threshold)
    meta = _saved_rsd_meta(spec)
    asked = f"--decode {mode}" if mode != "saved" else "--check-greedy"
    if meta is None or meta.get("kind") != "rsd":  # RSDPolicy.kind
        if mode == "saved" and not check_greedy:
            return DecodeChoice()
        what = f"a {meta['kind']!r} policy" if meta is not None else "not a saved policy directory"
        raise ConfigError(f"{asked} chooses how an RSD policy decodes its RFSQ codes, and {spec!r} is {what}: pass a "
                          f"directory saved by RSDPolicy, or drop {asked}.")
    saved = meta.get("speculative", {})
    if mode in SPECULATIVE_MODES and not saved.get("has_draft"):
        raise ConfigError(f"--decode {mode} decodes speculatively with the policy's draft head, and {spec} was saved "
                          f"without one (policy.json: speculative.has_draft false): use --decode greedy, or save the "
                          f"policy with a trained DraftHead.")
    if mode == "saved":
        from rsd.policy.learned import saved_speculative

        speculative = saved_speculative(meta)
        effective = saved.get("mode", "exact") if speculative else "greedy"
        effective_threshold = saved.get("threshold") if speculative else None
        if effective == "match_rate" and effective_threshold is None:
            effective_threshold = _threshold("match_rate", None)
    else:
        effective, effective_threshold = mode, threshold
    if check_greedy is None:
        check_greedy = mode == "exact"
    if check_greedy and effective == "greedy":
        raise ConfigError(f"--check-greedy compares speculative codes with greedy decoding, and {spec} decodes "
                          f"greedily ({'--decode greedy' if mode == 'greedy' else 'as saved'}): drop --check-greedy, "
                          f"or pass --decode exact/relaxed/match_rate.")
    return DecodeChoice(mode=mode, threshold=threshold, check_greedy=bool(check_greedy), effective=effective,
                        effective_threshold=effective_threshold)

"""Several episodes' chunks from one forward pass: the ``predict_chunks`` / ``reset_slot`` half of the learned
policies (``rsd.policy.learned``; ``rsd eval --backend batched``), and the per-row path both halves share.

Each row is one episode's unbatched observation (the contract in ``rsd.observation``). :func:`check_row` checks a
row against what the backbone reads (its ``observation_spec``), so an error names that row's own problem;
:func:`stacked_groups` groups the rows that stack (the same shapes and dtypes of the arrays read, the same values of
what is not an array: the object names of a task, which a batch shares) and stacks each group along a new leading
batch axis. The pixel backbone's rows (images + state) all stack together; the low-dimensional one's stack per task.
Then ``check_hidden_rows`` checks each row's hidden state, the heads decode all rows at once, and each row becomes
its own ActionChunk, or its own error.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rsd.backbones.base import check_hidden_rows
from rsd.errors import BatchActionError, ConfigError, NonFiniteError, ShapeError
from rsd.observation import OBJECT_NAMES, OBJECT_POSES, RAW, STATE, ObservationSpec
from rsd.policy.protocol import ActionChunk

__all__ = ["BatchedPrediction", "check_row", "stacked_groups"]


def _read_keys(backbone: Any, observation: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys of ``observation`` the backbone reads: those its ``observation_spec`` names, else all but ``raw``."""
    spec = getattr(backbone, "observation_spec", None)
    if not isinstance(spec, ObservationSpec):
        return tuple(k for k in observation if k != RAW)
    keys = (*spec.images, STATE, *((OBJECT_POSES, OBJECT_NAMES) if spec.objects else ()), *((RAW,) if spec.raw else ()))
    return tuple(k for k in keys if k in observation)


def check_row(backbone: Any, observation: Any) -> None:
    """``observation`` is one unbatched observation the backbone can read (its ``observation_spec``, when it has
    one): ShapeError / DTypeError / NonFiniteError naming the key, as the backbone's own check would."""
    spec = getattr(backbone, "observation_spec", None)
    if isinstance(spec, ObservationSpec):
        spec.validate(observation)
        if np.ndim(observation[STATE]) != 1:
            raise ShapeError(f"predict_chunks takes one unbatched observation per row; this row's state has shape "
                             f"{list(np.shape(observation[STATE]))}.")


def _layout(value: Any) -> tuple[Any, ...]:
    """What must agree between rows for ``value`` to stack: an array's shape and dtype, any other value itself."""
    if isinstance(value, np.ndarray):
        return ("array", value.shape, value.dtype.str)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device))
    return ("value", repr(value))


def stacked_groups(backbone: Any, observations: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], dict[str, Any]]]:
    """``(row indices, their batched observation)`` for each group of rows that stack, in order of first
    appearance: the keys the backbone reads (:func:`_read_keys`), each array stacked along a new leading axis
    ``B``, every other value (the object names: the same in every row of a group) taken once."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, obs in enumerate(observations):
        signature = tuple((key, _layout(obs[key])) for key in _read_keys(backbone, obs))
        groups.setdefault(signature, []).append(i)
    out = []
    for signature, rows in groups.items():
        batch: dict[str, Any] = {}
        for key, (kind, *_) in signature:
            values = [observations[i][key] for i in rows]
            batch[key] = np.stack(values) if kind == "array" else torch.stack(values) if kind == "tensor" else values[0]
        out.append((rows, batch))
    return out


class BatchedPrediction:
    """What a learned policy adds for several episodes at once (mixed into ``rsd.policy.learned._LearnedPolicy``,
    which provides ``backbone``, ``config``, ``device``, ``kind``, ``num_calls``, ``postprocess``,
    ``_normalized_chunks`` and ``_generation_error``)."""

    backbone: Any
    config: Any
    device: torch.device
    kind: str
    num_calls: int

    def reset_slot(self, slot: int) -> None:
        """A new episode in ``slot`` of :meth:`predict_chunks` (what :meth:`reset` is to :meth:`predict_chunk`): a
        backbone with history forgets that slot's."""
        self._check_slots()
        backbone_reset = getattr(self.backbone, "reset_slot", None)
        if callable(backbone_reset):
            backbone_reset(slot)

    def predict_chunks(self, observations: Sequence[Mapping[str, Any]], instructions: Sequence[str],
                       slots: Sequence[int]) -> list[ActionChunk]:
        """The next chunk of several episodes at once: row ``i`` is the unbatched observation and the instruction of
        the episode running in ``slots[i]`` (one row per slot; :meth:`reset_slot` at each of its episode starts).

        One backbone forward per group of rows that stack (``rsd.policy.batching``: all rows for an image backbone,
        one group per task for the low-dimensional one), one head decode of all rows. Row ``i``'s chunk and ``info``
        are what :meth:`predict_chunk` gives for that episode alone, up to float summation order (greedy codes
        equal but where two logits tie; speculative statistics and the greedy check per row), except the timings,
        which are the batch's. Rows that fail raise :class:`BatchActionError`, whose ``results`` give each row
        its chunk or its own :class:`ActionGenerationError`; ShapeError for mismatched arguments; ConfigError for
        a backbone whose history is not kept per slot."""
        n = len(observations)
        if n == 0 or len(instructions) != n or len(slots) != n:
            raise ShapeError(f"predict_chunks needs one instruction and one slot per observation, at least one row: "
                             f"got {n} observations, {len(instructions)} instructions, {len(slots)} slots.")
        if len(set(slots)) != n:
            raise ShapeError(f"predict_chunks got slots {list(slots)}: a slot is one episode, so one row per slot.")
        self._check_slots()
        try:
            rows = self._predict_rows(list(observations), list(instructions), list(slots))
        except Exception as exc:  # a failure of the whole batch: every row's
            rows = [exc] * n
        failed = {i: self._generation_error(instructions[i], r) for i, r in enumerate(rows) if isinstance(r, Exception)}
        if failed:
            first = failed[min(failed)]
            raise BatchActionError(f"{type(self).__name__}: {len(failed)} of {n} rows (rows {sorted(failed)}) failed; "
                                   f"row {min(failed)}: {first}", [failed.get(i, r) for i, r in enumerate(rows)])
        return rows

    def _check_slots(self) -> None:
        """ConfigError for a backbone that keeps history between chunks (``reset``) but not per slot."""
        backbone = self.backbone
        if callable(getattr(backbone, "reset", None)) and not callable(getattr(backbone, "encode_slots", None)):
            raise ConfigError(f"{type(self).__name__}'s backbone {type(backbone).__name__} keeps history between "
                              f"chunks (reset()) but not per episode slot (encode_slots / reset_slot): batching "
                              f"several episodes would mix their histories. Run it one episode at a time "
                              f"(predict_chunk; rsd eval --backend local).")

    @torch.inference_mode()
    def _predict_rows(self, observations: list[Mapping[str, Any]], instructions: list[str],
                      slots: list[int]) -> list[ActionChunk | Exception]:
        """Per row, its chunk or the exception that row alone raises (an exception of the whole batch propagates)."""
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        rows: list[ActionChunk | Exception | None] = [None] * len(observations)
        valid = []
        for i, observation in enumerate(observations):
            try:
                check_row(self.backbone, observation)
                valid.append(i)
            except Exception as exc:
                rows[i] = exc
        order, parts = [], []  # rows encoded, in the order of their hidden states
        for group, batch in stacked_groups(self.backbone, [observations[i] for i in valid]):
            members = [valid[j] for j in group]
            try:
                hidden = self._encode_rows(batch, [instructions[i] for i in members], [slots[i] for i in members])
                if hidden.shape[0] != len(members):
                    raise ShapeError(f"the backbone returned {hidden.shape[0]} hidden states for {len(members)} rows.")
            except Exception as exc:
                for i in members:
                    rows[i] = exc
                continue
            order.extend(members)
            parts.append(hidden)
        if order:
            hidden = torch.cat(parts)  # [B, D]
            norms, dead = check_hidden_rows(hidden, self.config.hidden_dim)  # the one check, one sync
            for j, exc in dead.items():
                rows[order[j]] = exc
            live = [j for j in range(len(order)) if j not in dead]
            if live:
                hidden = (hidden if len(live) == len(order) else hidden[live]).to(self.device, torch.float32)
                timing["backbone_ms"] = 1e3 * (time.perf_counter() - t0)
                for j, chunk in zip(live, self._chunks(hidden, [norms[j] for j in live], timing, t0)):
                    rows[order[j]] = chunk
        assert all(r is not None for r in rows)
        return rows  # type: ignore[return-value]

    def _encode_rows(self, observation: dict[str, Any], instructions: list[str], slots: list[int]) -> torch.Tensor:
        encode_slots = getattr(self.backbone, "encode_slots", None)
        if callable(encode_slots):  # a backbone with history: each row continues its slot's episode
            return encode_slots(observation, instructions, slots, check=False)
        return self.backbone.encode(observation, instructions, check=False)

    def _chunks(self, hidden: torch.Tensor, hidden_norms: list[float], timing: dict[str, float],
                t0: float) -> list[ActionChunk | Exception]:
        """Checked hidden states [B, D] -> per row its ActionChunk, or the exception that row raised (the greedy
        check, a non-finite chunk); an exception of the whole batch (the heads) propagates."""
        norm, infos = self._normalized_chunks(hidden, timing)  # [B, C, A], per row its info or its error
        t2 = time.perf_counter()
        norm_np = norm.detach().to("cpu", torch.float32).numpy()
        rows: list[ActionChunk | Exception] = []
        for normalized, info, hidden_norm in zip(norm_np, infos, hidden_norms):
            if isinstance(info, Exception):
                rows.append(info)
                continue
            try:
                if not np.isfinite(normalized).all():
                    raise NonFiniteError("the decoded action chunk contains NaN/inf.")
                actions = self.postprocess(normalized)
            except Exception as exc:
                rows.append(exc)
                continue
            self.num_calls += 1
            info.update({
                "policy": self.kind,
                "timing_ms": timing,  # the batch's, completed below
                "hidden_shape": [1, hidden.shape[1]],
                "hidden_norm": hidden_norm,
                "action_min": float(actions.min()),
                "action_max": float(actions.max()),
                "first_action": actions[0].tolist(),
                "num_calls": self.num_calls,
            })
            rows.append(ActionChunk(actions=actions, info=info))
        timing["postprocess_ms"] = 1e3 * (time.perf_counter() - t2)
        timing["total_ms"] = 1e3 * (time.perf_counter() - t0)
        return rows


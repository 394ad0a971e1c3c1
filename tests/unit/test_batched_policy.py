"""Several episodes at once (``predict_chunks`` / ``reset_slot`` of the learned policies, ``rsd.policy.batching``;
what ``rsd eval --backend batched`` serves): each row equals ``predict_chunk`` of that episode alone, the low-dim
backbone's history is kept per slot, errors stay with their row, and what cannot be batched is refused."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import torch

from rsd.backbones import TinyBackbone
from rsd.backbones.lowdim import LowDimBackbone, lowdim_inputs
from rsd.backbones.pixel import PixelBackbone
from rsd.errors import ActionGenerationError, BatchActionError, ConfigError, NonFiniteError, SpeculativeMismatchError
from rsd.eval.batched import BatchedRunner, PolicyClient, check_batchable, format_server_stats
from rsd.eval.decoding import RecordingPolicy
from rsd.eval.evaluation import EvalConfig
from rsd.eval.records import EpisodeKey
from rsd.heads import DraftHead, L1ActionHead, RFSQHead
from rsd.observation import OBJECT_NAMES, RAW, STATE, ObservationSpec
from rsd.policy import L1Policy, RSDPolicy
from rsd.policy.greedy_check import compare_rows_with_greedy, compare_with_greedy
from rsd.sim.experts import ScriptedExpert
from rsd.speculative import SpeculativeDecoder
from rsd.tokenizer import RFSQTokenizer
from tests._batched_world import settings
from tests.policy_factory import ACTION_STATS, tiny_config, tiny_rsd_policy

pytestmark = pytest.mark.unit

LOWDIM = ObservationSpec(images=(), objects=True)
PIXEL = ObservationSpec()  # 224 px cameras, resized by the backbone
INSTRUCTIONS = ["put the bowl on the plate", "open the top drawer", "pick up the ketchup"]
SLOTS = [4, 9, 2]
DECODES = {"greedy": {"speculative": False}, "exact": {"mode": "exact", "check_greedy": True},
           "relaxed": {"mode": "relaxed", "threshold": 1, "check_greedy": True},
           "match_rate": {"mode": "match_rate", "threshold": 0.5}}
BATCH_ONLY = ("timing_ms", "num_calls", "hidden_norm")  # the batch's timings and call count; a norm summed otherwise


def _lowdim() -> LowDimBackbone:
    return LowDimBackbone(hidden_dim=32, width=16, layers=1, heads=2, word_buckets=64, motion=True).eval()


def _pixel() -> PixelBackbone:
    return PixelBackbone(hidden_dim=32, image_size=32, channels=8, width=16, word_buckets=64).eval()


BACKBONES = {"lowdim": (_lowdim, LOWDIM), "pixel": (_pixel, PIXEL)}


def _rsd(backbone: Any, **decode: Any) -> RSDPolicy:
    torch.manual_seed(0)
    cfg = tiny_config(backbone.hidden_dim)
    return RSDPolicy(backbone, RFSQHead(cfg), RFSQTokenizer.from_config(cfg), ACTION_STATS, config=cfg,
                     draft=DraftHead(cfg), **decode)


def _l1(backbone: Any) -> L1Policy:
    torch.manual_seed(0)
    cfg = tiny_config(backbone.hidden_dim)
    return L1Policy(backbone, L1ActionHead(cfg), ACTION_STATS, config=cfg)


def _observations(spec: ObservationSpec, step: int) -> list[dict]:
    """One observation per slot; the last slot runs another task (other objects: a group of its own, low-dim)."""
    rows = [spec.fake(100 * row + step) for row in range(len(SLOTS))]
    if spec.objects:
        rows[-1] = ObservationSpec(images=(), objects=True).fake(100 * len(SLOTS) + step)
        rows[-1][OBJECT_NAMES] = ("basket_1", "ketchup_1", "milk_1")
    return rows


def _side_by_side(policy: Any, spec: ObservationSpec, steps: int = 3) -> list[tuple[list, list]]:
    """Each step's ``predict_chunks`` of all slots, and ``predict_chunk`` of a copy of the policy per slot."""
    alone = [copy.deepcopy(policy) for _ in SLOTS]
    for p in alone:
        p.reset()
    for slot in SLOTS:
        policy.reset_slot(slot)
    out = []
    for step in range(steps):
        rows = _observations(spec, step)
        got = policy.predict_chunks(rows, INSTRUCTIONS, SLOTS)
        want = [p.predict_chunk(o, t) for p, o, t in zip(alone, rows, INSTRUCTIONS)]
        out.append((got, want))
    return out


def _info(chunk: Any) -> dict:
    return {k: v for k, v in chunk.info.items() if k not in BATCH_ONLY}


@pytest.mark.parametrize("backbone, decode", [*(("lowdim", d) for d in sorted(DECODES)), ("pixel", "greedy"),
                                               ("pixel", "exact")])  # the decoders see only hidden states
def test_each_row_equals_predict_chunk_of_its_episode_alone(backbone: str, decode: str) -> None:
    make, spec = BACKBONES[backbone]
    for got, want in _side_by_side(_rsd(make(), **DECODES[decode]), spec, steps=3 if backbone == "lowdim" else 2):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.actions, w.actions)  # greedy codes: no argmax tie at these seeds
            assert _info(g) == _info(w)  # codes, spec_stats and greedy_check per row
            assert g.info["hidden_norm"] == pytest.approx(w.info["hidden_norm"], rel=1e-5)
            assert ("spec_stats" in g.info) == (decode != "greedy")
            if decode != "greedy":  # one chunk's statistics, as rsd.eval.decoding counts them
                assert len(g.info["spec_stats"]["accepted_layers"]) == 1


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_l1_rows_match_predict_chunk(backbone: str) -> None:
    make, spec = BACKBONES[backbone]
    for got, want in _side_by_side(_l1(make()), spec, steps=2):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.actions, w.actions, rtol=1e-5, atol=1e-6)
            assert g.info["used_rfsq"] is False and g.info["hidden_shape"] == [1, 32]


@torch.inference_mode()
def test_the_lowdim_history_is_kept_per_slot_and_reset_slot_forgets_it() -> None:
    bb = _lowdim()
    a1, a2, b1 = (LOWDIM.fake(s) for s in (1, 2, 3))
    bb.encode_slots(a1, [INSTRUCTIONS[0]], [0])
    bb.encode_slots(b1, [INSTRUCTIONS[1]], [1])  # another episode in between: slot 0 keeps its own state
    inputs = lowdim_inputs(a2, INSTRUCTIONS[0], bb.observation_spec, bb.word_buckets,
                           torch.as_tensor(a1[STATE])[None], motion=True)
    torch.testing.assert_close(bb.encode_slots(a2, [INSTRUCTIONS[0]], [0]), bb.forward_inputs(inputs), rtol=0, atol=0)
    first = bb.encode(a1, INSTRUCTIONS[0])  # encode's own history: apart from the slots'
    bb.reset_slot(0)  # a new episode in slot 0: zero motion, as encode's first chunk
    torch.testing.assert_close(bb.encode_slots(a1, [INSTRUCTIONS[0]], [0]), first, rtol=0, atol=0)
    with pytest.raises(Exception, match="one distinct slot"):
        bb.encode_slots({k: np.stack([v, v]) if k != OBJECT_NAMES else v for k, v in a1.items()},
                        INSTRUCTIONS[:2], [5, 5])


def test_slots_interleave_as_separate_episodes_and_rows_stack_per_task(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = _rsd(_lowdim(), speculative=False)
    calls: list[int] = []
    encode_slots = policy.backbone.encode_slots
    monkeypatch.setattr(policy.backbone, "encode_slots", lambda obs, instr, slots, **kw: calls.append(len(slots))
                        or encode_slots(obs, instr, slots, **kw))
    alone = [copy.deepcopy(policy) for _ in range(2)]
    steps = [_observations(LOWDIM, s)[:2] for s in range(3)]
    for p in alone:
        p.reset()
    got = [policy.predict_chunks([steps[0][0]], INSTRUCTIONS[:1], [7]),  # slot 7 alone, then slot 8 alone,
           policy.predict_chunks([steps[0][1]], INSTRUCTIONS[1:2], [8]),  # then both: each continues its own
           policy.predict_chunks([steps[1][0], steps[1][1]], INSTRUCTIONS[:2], [7, 8])]
    want = [alone[0].predict_chunk(steps[0][0], INSTRUCTIONS[0]), alone[1].predict_chunk(steps[0][1], INSTRUCTIONS[1]),
            alone[0].predict_chunk(steps[1][0], INSTRUCTIONS[0]), alone[1].predict_chunk(steps[1][1], INSTRUCTIONS[1])]
    for g, w in zip([*got[0], *got[1], *got[2]], want):
        np.testing.assert_array_equal(g.actions, w.actions)
    calls.clear()
    policy.predict_chunks(_observations(LOWDIM, 5), INSTRUCTIONS, SLOTS)  # two tasks: two forwards (2 rows, 1 row)
    assert calls == [2, 1]


def test_pixel_rows_of_different_tasks_stack_into_one_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = _rsd(_pixel(), speculative=False)
    calls: list[int] = []
    encode = policy.backbone.encode
    monkeypatch.setattr(policy.backbone, "encode",
                        lambda obs, instr, **kw: calls.append(len(instr)) or encode(obs, instr, **kw))
    rows = [{**PIXEL.fake(i), **LOWDIM.fake(i), RAW: {"t": i}} for i in range(3)]  # object poses: not read
    rows[2][OBJECT_NAMES] = ("basket_1",)
    rows[2]["object_poses"] = np.zeros((1, 7), np.float32)
    assert len(policy.predict_chunks(rows, INSTRUCTIONS, SLOTS)) == 3 and calls == [3]


def test_a_failing_row_gets_its_own_error_and_the_others_their_chunks() -> None:
    policy = _rsd(_pixel(), mode="exact", check_greedy=True)
    rows = _observations(PIXEL, 0)
    rows[1] = {**rows[1], STATE: np.full(8, np.nan, np.float32)}
    with pytest.raises(BatchActionError, match=r"1 of 3 rows \(rows \[1\]\)") as info:
        policy.predict_chunks(rows, INSTRUCTIONS, SLOTS)
    ok0, bad, ok2 = info.value.results
    assert isinstance(bad, ActionGenerationError) and isinstance(bad.__cause__, NonFiniteError)
    assert repr(INSTRUCTIONS[1]) in str(bad)
    for got, row, text in ((ok0, rows[0], INSTRUCTIONS[0]), (ok2, rows[2], INSTRUCTIONS[2])):
        np.testing.assert_array_equal(got.actions, copy.deepcopy(policy).predict_chunk(row, text).actions)


def test_a_row_refused_by_the_greedy_check_carries_its_check(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = _rsd(_pixel(), mode="exact", check_greedy=True)
    decode = policy._decoder.decode

    def breaks_row_1(hidden: torch.Tensor) -> tuple[torch.Tensor, Any]:
        codes, stats = decode(hidden)
        codes = codes.clone()
        codes[1, 0, 0, -1] = (codes[1, 0, 0, -1] + 1) % policy.config.num_levels
        return codes, stats

    monkeypatch.setattr(policy._decoder, "decode", breaks_row_1)
    with pytest.raises(BatchActionError) as info:
        policy.predict_chunks(_observations(PIXEL, 0), INSTRUCTIONS, SLOTS)
    ok0, bad, ok2 = info.value.results
    assert isinstance(bad.__cause__, SpeculativeMismatchError)
    assert bad.__cause__.check == {"chunks": 1, "codes_equal": False, "tokens": 4 * 4 * 4, "tokens_differing": 1}
    assert ok0.info["greedy_check"]["codes_equal"] and ok2.info["greedy_check"]["chunks"] == 1


def test_spec_stats_and_greedy_check_per_row_equal_those_of_the_row_alone() -> None:
    policy = tiny_rsd_policy(speculative=True, seed=3)
    hidden = 3 * torch.randn(16, policy.config.hidden_dim, generator=torch.Generator().manual_seed(0))
    for mode, threshold in (("exact", None), ("relaxed", 1), ("match_rate", 0.5)):
        decoder = SpeculativeDecoder(policy.draft, policy.head, mode=mode, threshold=threshold)
        codes, stats = decoder.decode(hidden)
        rows = compare_rows_with_greedy(policy.head, hidden, codes, mode)
        for i in range(hidden.shape[0]):
            alone_codes, alone = decoder.decode(hidden[i: i + 1])
            assert torch.equal(alone_codes, codes[i: i + 1])
            assert stats.row(i) == alone and stats.row(i).to_dict() == alone.to_dict()
            assert alone.row(0) == alone and alone.row(0).row_token_match_rate == alone.row_token_match_rate
            assert rows[i] == compare_with_greedy(policy.head, hidden[i: i + 1], codes[i: i + 1], mode)


def test_a_backbone_with_history_but_no_slots_is_refused() -> None:
    class Remembers(TinyBackbone):
        def reset(self) -> None:
            pass

    policy = tiny_rsd_policy(Remembers(hidden_dim=32, image_size=32, width=16))
    with pytest.raises(ConfigError, match="Remembers keeps history between chunks"):
        policy.reset_slot(0)
    with pytest.raises(ConfigError, match="--backend local"):
        policy.predict_chunks([ObservationSpec(image_size=32).fake(0)], ["go"], [0])


def test_mismatched_arguments_are_shape_errors() -> None:
    policy = tiny_rsd_policy()
    obs = ObservationSpec(image_size=32).fake(0)
    for args in (([], [], []), ([obs], ["a", "b"], [0]), ([obs, obs], ["a", "b"], [3, 3])):
        with pytest.raises(ValueError, match="slot"):
            policy.predict_chunks(*args)


def test_policies_without_predict_chunks_are_refused_by_name(tmp_path) -> None:
    with pytest.raises(ConfigError, match="ScriptedExpert has no predict_chunks / reset_slot.*--backend local"):
        check_batchable(ScriptedExpert())
    check_batchable(tiny_rsd_policy())
    runner = BatchedRunner(settings(tmp_path), ScriptedExpert, 2)  # refused before a worker starts
    with pytest.raises(ConfigError, match="ScriptedExpert"):
        list(runner.results([EpisodeKey("libero_spatial", 0, 0)]))
    with pytest.raises(ConfigError, match="--policy expert runs one episode at a time"):
        EvalConfig(suite="libero_spatial", policy="expert", out=tmp_path, backend="batched")
    with pytest.raises(ConfigError, match="--batch-window-ms"):
        EvalConfig(suite="libero_spatial", policy="expert", out=tmp_path, batch_window_ms=3.0)
    with pytest.raises(ConfigError, match="--batch-window-ms"):
        BatchedRunner(settings(tmp_path), ScriptedExpert, 2, window_ms=0)
    with pytest.raises(ConfigError, match="--batch-pad pads the policy server's batches of --backend batched"):
        EvalConfig(suite="libero_spatial", policy="expert", out=tmp_path, batch_pad=True)


class _Conn:
    """One end of a pipe: what was sent, and the replies to hand out."""

    def __init__(self, *replies: Any) -> None:
        self.sent: list[Any] = []
        self.replies = list(replies)

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def recv(self) -> Any:
        return self.replies.pop(0)


def test_the_client_sends_its_slot_and_raises_the_servers_error_with_its_cause() -> None:
    check = {"chunks": 1, "codes_equal": False, "tokens": 64, "tokens_differing": 2}
    cause = SpeculativeMismatchError("differ from greedy")
    cause.check = check
    error = ActionGenerationError("RSDPolicy failed to generate an action chunk for 'go': ...")
    client = _Conn(("error", error, cause, "Traceback (server) ..."))
    recorder = RecordingPolicy(PolicyClient(3, client))
    recorder.reset()
    with pytest.raises(ActionGenerationError) as info:
        recorder.predict_chunk({STATE: np.zeros(8, np.float32), RAW: {"big": 1}}, "go")
    assert info.value.__cause__ is cause and "policy server" in "".join(info.value.__notes__)
    assert client.sent[0] == ("reset", 3)
    kind, slot, observation, instruction = client.sent[1]
    assert (kind, slot, instruction, sorted(observation)) == ("predict", 3, "go", [STATE])  # raw stays in the worker
    tally = recorder.tally()
    assert (tally.greedy_checked, tally.greedy_mismatched, tally.greedy_tokens_differing) == (1, 1, 2)


def test_server_stats_are_printed_per_batch_size() -> None:
    stats = {"workers": 4, "window_ms": 5.0, "batches": 3, "chunks": 7, "mean_batch_size": 7 / 3,
             "batch_sizes": {"2": 2, "3": 1},
             "latency_ms": {"2": {"p50": 1.0, "p90": 2.0}, "3": {"p50": 1.5, "p90": 2.5}},
             "worker_restarts": 0}
    text = format_server_stats(stats)
    assert "7 chunks in 3 batches from 4 env workers (mean batch 2.33; window 5 ms" in text
    assert "batches per size: 2: 2, 3: 1" in text and "2: 1.0 / 2.0 ms, 3: 1.5 / 2.5 ms" in text
    assert json.loads(json.dumps(stats)) == stats

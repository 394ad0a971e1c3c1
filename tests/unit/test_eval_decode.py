"""``rsd eval --decode/--threshold/--check-greedy``: refusals, the greedy check inside RSDPolicy, the speculative
statistics in episodes.jsonl and summary.json, --resume, --fast, and a tiny end-to-end eval on a fake env (CPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rsd import cli
from rsd import eval as ev
from rsd.errors import ActionGenerationError, ConfigError, ResumeMismatchError, SpeculativeMismatchError
from rsd.eval.decoding import RecordingPolicy, SpecTally, summarize_spec
from rsd.policy import RSDPolicy, fast_plan, load_policy, make_policy
from rsd.policy.decode import DecodeChoice, resolve_decode
from rsd.policy.greedy_check import compare_with_greedy
from rsd.speculative import SpeculativeDecoder, greedy_decode
from tests._eval_stubs import NoEpisodes, Succeeds
from tests._fake_env import FakeEnv
from tests.policy_factory import IMAGE, fake_observation, tiny_l1_policy, tiny_rsd_policy

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policies")
    return {"spec": tiny_rsd_policy(speculative=True).save_pretrained(root / "spec"),
            "greedy": tiny_rsd_policy(speculative=False).save_pretrained(root / "greedy"),
            "l1": tiny_l1_policy().save_pretrained(root / "l1")}


def _config(out: Path, **kw: Any) -> ev.EvalConfig:
    base: dict[str, Any] = {"suite": "libero_spatial", "policy": "expert", "out": out, "trials": 2, "render": False,
                            "video": "none", "progress": False, "plot": False}
    base.update(kw)
    return ev.EvalConfig(**base)


# ------------------------------------------------------------------------------------------------ the options


def test_cli_parses_decode_threshold_and_check_greedy() -> None:
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    args = parser.parse_args(["--policy", "p", "--out", "o"])
    assert (args.decode, args.threshold, args.check_greedy) == ("saved", None, None)
    args = parser.parse_args(["--policy", "p", "--out", "o", "--decode", "relaxed", "--threshold", "2"])
    assert (args.decode, args.threshold) == ("relaxed", 2) and isinstance(args.threshold, int)
    args = parser.parse_args(["--policy", "p", "--out", "o", "--decode", "match_rate", "--threshold", "0.8",
                              "--no-check-greedy"])
    assert (args.threshold, args.check_greedy) == (0.8, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--policy", "p", "--out", "o", "--decode", "sampled"])


@pytest.mark.parametrize("kw, words", [
    ({"decode": "greedy", "threshold": 1}, "--decode greedy takes none"),
    ({"decode": "exact", "threshold": 1}, "--decode exact takes none"),
    ({"threshold": 0.5}, "--decode saved takes none"),
    ({"decode": "relaxed"}, "relaxed --threshold.*int >= 0"),
    ({"decode": "relaxed", "threshold": 0.5}, "relaxed --threshold"),
    ({"decode": "match_rate", "threshold": 1.5}, r"match_rate --threshold.*\[0, 1\]"),
])
def test_bad_thresholds_are_refused(kw: dict, words: str, dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=words):
        _config(tmp_path / "out", policy=str(dirs["spec"]), **kw)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("policy, kw, words", [
    ("expert", {"decode": "greedy"}, "not a saved policy directory"),
    ("expert-rfsq", {"decode": "exact"}, "not a saved policy directory"),
    ("expert", {"check_greedy": True}, "--check-greedy .*not a saved policy"),
    ("l1", {"decode": "exact"}, "'l1' policy"),
    ("greedy", {"decode": "exact"}, "without one.*--decode greedy"),
    ("greedy", {"decode": "relaxed", "threshold": 1}, "has_draft false"),
    ("greedy", {"check_greedy": True}, "decodes greedily"),
    ("spec", {"decode": "greedy", "check_greedy": True}, "--check-greedy .*--decode greedy"),
])
def test_decode_that_cannot_apply_is_refused(policy: str, kw: dict, words: str, dirs: dict[str, Path],
                                             tmp_path: Path) -> None:
    spec = str(dirs[policy]) if policy in dirs else policy
    with pytest.raises(ConfigError, match=words):
        _config(tmp_path / "out", policy=spec, **kw)
    with pytest.raises(ConfigError, match=words):
        make_policy(spec, device="cpu", **kw)
    assert not (tmp_path / "out").exists()


def test_cli_refusal_exits_1_and_writes_nothing(dirs: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    code = cli.main(["eval", "--policy", str(dirs["l1"]), "--out", str(out), "--no-render", "--trials", "1",
                     "--decode", "exact"])
    assert code == 1
    assert "ConfigError" in capsys.readouterr().err and not out.exists()


def test_resolve_decode_defaults_and_effective_mode(dirs: dict[str, Path]) -> None:
    assert resolve_decode("expert") == DecodeChoice()
    assert resolve_decode(str(dirs["l1"])) == DecodeChoice()
    assert resolve_decode(str(dirs["spec"])).effective == "exact"
    assert resolve_decode(str(dirs["greedy"])).effective == "greedy"
    exact = resolve_decode(str(dirs["spec"]), "exact")
    assert exact.check_greedy is True and exact.speculative is True  # the check is on by default for exact
    assert resolve_decode(str(dirs["spec"]), "exact", check_greedy=False).check_greedy is False
    relaxed = resolve_decode(str(dirs["spec"]), "relaxed", 1)
    assert (relaxed.check_greedy, relaxed.threshold) == (False, 1)
    assert resolve_decode(str(dirs["spec"]), "match_rate").threshold == 0.7  # recorded resolved


# ------------------------------------------------------------------------------------------------ the policy


def test_decode_overrides_reach_the_loaded_policy(dirs: dict[str, Path], tmp_path: Path) -> None:
    greedy = make_policy(str(dirs["spec"]), device="cpu", decode="greedy")
    assert isinstance(greedy, RSDPolicy) and not greedy.speculative and greedy._decoder is None
    relaxed = load_policy(dirs["spec"], decode="relaxed", threshold=2)
    assert (relaxed.speculative, relaxed._decoder.mode, relaxed._decoder.threshold) == (True, "relaxed", 2)
    # a policy saved relaxed, asked for exact: the saved threshold belongs to the saved mode and is not passed on
    saved = tiny_rsd_policy(speculative=True)
    saved.mode, saved.threshold = "relaxed", 1
    directory = saved.save_pretrained(tmp_path / "relaxed")
    assert load_policy(directory)._decoder.threshold == 1
    exact = load_policy(directory, decode="exact")
    assert (exact._decoder.mode, exact._decoder.threshold, exact.check_greedy) == ("exact", None, True)


def test_exact_equals_greedy_on_many_hidden_states_and_the_check_counts_them() -> None:
    policy = tiny_rsd_policy(speculative=True, seed=3)
    decoder = SpeculativeDecoder(policy.draft, policy.head, mode="exact")
    gen = torch.Generator().manual_seed(0)
    hidden = 3 * torch.randn(64, policy.config.hidden_dim, generator=gen)
    codes, stats = decoder.decode(hidden)
    assert torch.equal(codes, greedy_decode(policy.head, hidden))
    check = compare_with_greedy(policy.head, hidden, codes, "exact")
    assert check == {"chunks": 64, "codes_equal": True, "tokens": codes.numel(), "tokens_differing": 0}

    policy.check_greedy = True  # every chunk through predict_chunk: checked, equal
    policy._decoder = decoder
    infos = [policy.predict_chunk(fake_observation(seed), "do it").info for seed in range(12)]
    assert all(i["greedy_check"]["codes_equal"] and i["greedy_check"]["chunks"] == 1 for i in infos)
    assert all(i["timing_ms"]["greedy_check_ms"] >= 0 for i in infos)


def _broken(decoder: SpeculativeDecoder) -> Any:
    """The decoder with its codes altered: one code of the last layer moved by one level."""
    decode = decoder.decode

    def altered(hidden: torch.Tensor) -> tuple[torch.Tensor, Any]:
        codes, stats = decode(hidden)
        codes = codes.clone()
        codes[..., 0, 0, -1] = (codes[..., 0, 0, -1] + 1) % decoder.main.cfg.num_levels
        return codes, stats
    return altered


def test_a_broken_exact_decoder_raises_the_typed_error(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    policy = make_policy(str(dirs["spec"]), device="cpu", decode="exact")
    monkeypatch.setattr(policy._decoder, "decode", _broken(policy._decoder))
    with pytest.raises(ActionGenerationError) as info:
        policy.predict_chunk(fake_observation(0), "do it")
    assert isinstance(info.value.__cause__, SpeculativeMismatchError)
    assert "differ from greedy" in str(info.value) and "--decode greedy" in str(info.value)
    recorder = RecordingPolicy(policy)  # rsd eval counts the refused chunk before the error goes on
    with pytest.raises(ActionGenerationError):
        recorder.predict_chunk(fake_observation(0), "do it")
    tally = recorder.tally()
    assert (tally.greedy_checked, tally.greedy_mismatched, tally.greedy_tokens_differing) == (1, 1, 1)


def test_relaxed_counts_mismatches_without_raising(dirs: dict[str, Path]) -> None:
    levels = tiny_rsd_policy().config.num_levels
    policy = make_policy(str(dirs["spec"]), device="cpu", decode="relaxed", threshold=levels - 1, check_greedy=True)
    recorder = RecordingPolicy(policy)  # every draft layer passes: the draft's codes, which differ from greedy's
    for seed in range(4):
        check = recorder.predict_chunk(fake_observation(seed), "do it").info["greedy_check"]
        assert not check["codes_equal"] and check["tokens_differing"] > 0
    tally = recorder.tally()
    k = policy.config.draft_layers
    assert (tally.chunks, tally.greedy_checked, tally.greedy_mismatched) == (4, 4, 4)
    assert tally.mean_accepted_layers == k and tally.layer_accepted == (4,) * k == tally.layer_attempted


# ------------------------------------------------------------------------------------------------ records, summary


def _result(task: int, trial: int, spec: SpecTally | None, lat: tuple[float, ...] = (5.0, 7.0)) -> ev.EpisodeResult:
    return ev.EpisodeResult(suite="libero_spatial", task_id=task, task_name=f"t{task}", instruction="i", trial=trial,
                            init_state_index=trial, success=trial % 2 == 0, steps=8, error=None, latency_p50_ms=6.0,
                            latency_p90_ms=7.0, chunk_latencies_ms=lat, wall_s=0.1, video=None, seed=7,
                            speculative=spec)


def test_summaries_aggregate_acceptance_and_greedy_check() -> None:
    a = SpecTally(chunks=2, accepted_layers_sum=3, layer_accepted=(2, 1), layer_attempted=(2, 2), greedy_checked=2,
                  greedy_mismatched=1, greedy_tokens_differing=5, greedy_check_ms=(1.0, 2.0))
    b = SpecTally(chunks=2, accepted_layers_sum=0, layer_accepted=(0, 0), layer_attempted=(2, 0))
    records = [_result(0, 0, a), _result(0, 1, b), _result(1, 0, a), _result(1, 1, None)]
    keys = [ev.EpisodeKey("libero_spatial", t, i) for t in (0, 1) for i in (0, 1)]
    summary = ev.summarize(records, keys)
    t0, overall = summary["per_task"]["0"]["speculative"], summary["overall"]["speculative"]
    assert (t0["chunks"], t0["mean_accepted_layers"]) == (4, 0.75)
    assert (t0["layer_accepted"], t0["layer_attempted"]) == ([2, 1], [4, 2])
    assert t0["layer_acceptance_rate"] == [0.5, 0.5]
    assert (t0["greedy_checked_chunks"], t0["greedy_mismatched_chunks"], t0["greedy_tokens_differing"]) == (2, 1, 5)
    assert t0["latency_without_check_p50_ms"] == pytest.approx(4.5)  # (5 - 1, 7 - 2)
    assert (overall["chunks"], overall["greedy_checked_chunks"], overall["greedy_mismatched_chunks"]) == (6, 4, 2)
    assert overall["layer_acceptance_rate"] == [4 / 6, 2 / 4]
    assert summarize_spec([_result(0, 0, None)]) is None
    table = ev.format_table(summary)
    assert "acc" in table and "greedy" in table and "1/2" in table and "2 of 4 chunks" in table
    assert "acc" not in ev.format_table(ev.summarize([_result(0, 0, None)], keys[:1]))


def test_records_round_trip_and_old_lines_still_load(tmp_path: Path) -> None:
    spec = SpecTally(chunks=1, accepted_layers_sum=2, layer_accepted=(1, 1), layer_attempted=(1, 1),
                     greedy_checked=1, greedy_check_ms=(0.123456,))
    results = ev.ResultsFile(tmp_path / ev.RESULTS_NAME)
    results.append(_result(0, 0, spec))
    old = json.loads(_result(0, 1, None).to_json())
    del old["speculative"]  # a line written before the field existed
    with open(results.path, "a") as f:
        f.write(json.dumps(old) + "\n")
    loaded = results.load()
    assert loaded[0].speculative == SpecTally(**{**spec.__dict__, "greedy_check_ms": (0.1235,)})
    assert loaded[1].speculative is None and loaded[1].trial == 1


# ------------------------------------------------------------------------------------------------ run.json, --resume


def test_run_json_and_summary_record_decode_and_resume_refuses_another(dirs: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    out, spec = tmp_path / "eval", str(dirs["spec"])
    outcome = ev.evaluate(_config(out, policy=spec, decode="match_rate", device="cpu", max_episodes=1), [0],
                          runner=Succeeds())
    run = json.loads((out / ev.RUN_NAME).read_text())
    assert (run["decode"], run["decode_threshold"], run["check_greedy"]) == ("match_rate", 0.7, False)
    assert outcome.summary["decode"] == {"mode": "match_rate", "threshold": 0.7, "check_greedy": False,
                                         "effective": "match_rate", "effective_threshold": 0.7}
    assert json.loads((out / ev.SUMMARY_NAME).read_text())["decode"]["mode"] == "match_rate"
    with pytest.raises(ResumeMismatchError, match=r"decoding \(--decode\): recorded 'match_rate' vs now 'exact'"):
        ev.evaluate(_config(out, policy=spec, decode="exact", device="cpu", resume=True), [0], runner=NoEpisodes())
    with pytest.raises(ResumeMismatchError, match=r"--threshold\): recorded 0.7 vs now 0.8"):
        ev.evaluate(_config(out, policy=spec, decode="match_rate", threshold=0.8, device="cpu", resume=True), [0],
                    runner=NoEpisodes())
    with pytest.raises(ResumeMismatchError, match=r"greedy check"):
        ev.evaluate(_config(out, policy=spec, decode="match_rate", check_greedy=True, device="cpu", resume=True),
                    [0], runner=NoEpisodes())
    ev.evaluate(_config(out, policy=spec, decode="match_rate", threshold=0.7, device="cpu", resume=True), [0],
                runner=NoEpisodes())


def test_a_run_json_from_before_decode_resumes_as_saved(dirs: dict[str, Path], tmp_path: Path) -> None:
    out, spec = tmp_path / "old", str(dirs["spec"])
    ev.evaluate(_config(out, policy=spec, device="cpu", max_episodes=1), [0], runner=Succeeds())
    record = json.loads((out / ev.RUN_NAME).read_text())
    for key in ("decode", "decode_threshold", "check_greedy"):
        del record[key]
    (out / ev.RUN_NAME).write_text(json.dumps(record))
    ev.evaluate(_config(out, policy=spec, device="cpu", resume=True), [0], runner=NoEpisodes())
    (out / ev.RUN_NAME).write_text(json.dumps(record))
    with pytest.raises(ResumeMismatchError, match="recorded 'saved' vs now 'greedy'"):
        ev.evaluate(_config(out, policy=spec, device="cpu", decode="greedy", resume=True), [0], runner=NoEpisodes())


def test_fast_follows_the_decode_choice(dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--decode greedy puts a speculative policy's heads on the graph; a speculative --decode keeps its decoder (on
    TinyBackbone, with no set_fast, --fast then has nothing to speed up, as for a policy saved speculative)."""
    assert fast_plan(dirs["spec"], speculative=False).graph_heads is True
    assert fast_plan(dirs["greedy"]).graph_heads is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _config(tmp_path / "a", policy=str(dirs["spec"]), decode="greedy", fast=True, device="cuda")
    with pytest.raises(ConfigError, match="nothing to speed up.*decodes speculatively"):
        _config(tmp_path / "b", policy=str(dirs["spec"]), decode="exact", fast=True, device="cuda")
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ end to end


class _TaskEnv(FakeEnv):
    task = SimpleNamespace(name="fake_task", instruction="put the bowl on the plate")

    def close(self) -> None:
        pass


def test_eval_end_to_end_on_a_fake_env(dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from rsd.sim import libero

    monkeypatch.setattr(libero, "make_env", lambda *a, **kw: _TaskEnv(render=True, image_size=IMAGE))
    out = tmp_path / "exact"
    outcome = ev.evaluate(_config(out, policy=str(dirs["spec"]), decode="exact", device="cpu", trials=2), [0])
    assert outcome.exit_code == 0
    lines = [json.loads(x) for x in (out / ev.RESULTS_NAME).read_text().splitlines()]
    chunks = -(-220 // tiny_rsd_policy().config.chunk_len)  # FakeEnv never succeeds: max steps
    assert [r["speculative"]["chunks"] for r in lines] == [chunks, chunks]
    assert all(r["speculative"]["greedy_checked"] == chunks and r["speculative"]["greedy_mismatched"] == 0
               for r in lines)
    spec = outcome.summary["overall"]["speculative"]
    assert (spec["greedy_checked_chunks"], spec["greedy_mismatched_chunks"]) == (2 * chunks, 0)
    assert "greedy check: 0 of" in capsys.readouterr().out

    broken = tmp_path / "broken"  # the same eval with a decoder that alters codes: the episode errors, exit 1
    decode = SpeculativeDecoder.decode
    monkeypatch.setattr(SpeculativeDecoder, "decode", lambda self, hidden: _broken_codes(decode(self, hidden), self))
    outcome = ev.evaluate(_config(broken, policy=str(dirs["spec"]), decode="exact", device="cpu", trials=2), [0])
    assert outcome.exit_code == 1
    line = json.loads((broken / ev.RESULTS_NAME).read_text().splitlines()[0])
    assert "SpeculativeMismatchError" in line["error"]
    assert line["speculative"]["greedy_mismatched"] == 1 and outcome.summary["overall"]["errors"] == 1


def _broken_codes(result: tuple[torch.Tensor, Any], decoder: SpeculativeDecoder) -> tuple[torch.Tensor, Any]:
    codes, stats = result
    codes = codes.clone()
    codes[..., 0, 0, 0] = (codes[..., 0, 0, 0] + 1) % decoder.main.cfg.num_levels
    return codes, stats

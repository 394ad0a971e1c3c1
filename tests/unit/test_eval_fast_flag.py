"""``rsd eval --fast``: parsed, threaded through EvalConfig into run.json / summary.json and the policy factory,
checked by ``--resume``, and refused loudly where it cannot apply (CPU device, scripted policy), on CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rsd import cli
from rsd import eval as ev
from rsd.errors import ConfigError
from rsd.policy.factory import make_policy
from rsd.policy import FastPlan, RSDPolicy, fast_plan, load_policy
from tests._eval_stubs import NoEpisodes, Succeeds, capture_policy_factories
from tests.policy_factory import fake_observation, tiny_l1_policy, tiny_rsd_policy

pytestmark = pytest.mark.unit

SCRIPTED = ("expert", "expert-rfsq", "expert-rfsq:/some/tokenizer")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny greedy RSD policy (TinyBackbone: no set_fast; its heads are what --fast would graph)."""
    return tiny_rsd_policy(speculative=False).save_pretrained(tmp_path_factory.mktemp("policy") / "rsd")


def _config(out: Path, **kw: Any) -> ev.EvalConfig:
    base: dict[str, Any] = {"suite": "libero_spatial", "policy": "learned", "out": out, "trials": 1,
                            "render": False, "video": "none", "progress": False, "plot": False}
    base.update(kw)
    return ev.EvalConfig(**base)


def test_cli_parses_fast() -> None:
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    assert parser.parse_args(["--policy", "p", "--out", "o"]).fast is False
    assert parser.parse_args(["--policy", "p", "--out", "o", "--fast", "--device", "cuda:0"]).fast is True
    text = parser.format_help()
    assert "--fast" in text and "speculative" in text and "CUDA" in text


@pytest.mark.parametrize("spec", SCRIPTED)
def test_fast_with_a_scripted_policy_is_refused(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--fast .*scripted.*drop --fast"):
        _config(tmp_path / "out", policy=spec, fast=True, device="cuda")
    with pytest.raises(ConfigError, match="scripted"):
        make_policy(spec, fast=True, device="cuda")
    assert not (tmp_path / "out").exists()


def test_fast_with_a_cpu_device_is_refused(policy_dir: Path, tmp_path: Path) -> None:
    for device in ("cpu", "meta"):
        with pytest.raises(ConfigError, match=r"needs a CUDA device.*--device cuda"):
            _config(tmp_path / "out", policy=str(policy_dir), fast=True, device=device)
        with pytest.raises(ConfigError, match=r"needs a CUDA device.*--device cuda"):
            make_policy(str(policy_dir), fast=True, device=device)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        load_policy(policy_dir, device="cpu", fast=True)
    with pytest.raises(ConfigError, match="needs a CUDA device"):  # before the checkpoint is looked for
        make_policy(f"openvla-oft:{tmp_path / 'missing'}", suite="libero_spatial", fast=True, device="cpu")
    assert not (tmp_path / "out").exists()


def test_fast_with_the_default_device_on_a_machine_without_cuda_is_refused(policy_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        make_policy(str(policy_dir), fast=True)


def test_without_fast_make_policy_is_unchanged(policy_dir: Path) -> None:
    policy = make_policy(str(policy_dir), device="cpu")
    assert isinstance(policy, RSDPolicy) and not policy.speculative
    chunk = policy.predict_chunk(fake_observation(1), "put the bowl on the plate")
    assert chunk.info["graphed"] is False and chunk.actions.shape == (policy.config.chunk_len, 7)


def test_cli_fast_on_cpu_exits_1_with_the_fix_and_writes_nothing(policy_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    code = cli.main(["eval", "--policy", str(policy_dir), "--out", str(out), "--no-render", "--trials", "1",
                     "--fast", "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "ConfigError" in err and "--device cuda" in err and "drop --fast" in err
    assert not out.exists()


def test_run_json_and_summary_record_fast_and_resume_needs_the_same(policy_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is checked at config time
    out = tmp_path / "eval"
    learned = {"policy": str(policy_dir), "device": "cuda", "trials": 2}
    outcome = ev.evaluate(_config(out, fast=True, max_episodes=1, **learned), [0], runner=Succeeds())
    assert json.loads((out / ev.RUN_NAME).read_text())["fast"] is True
    assert outcome.summary["fast"] is True
    assert json.loads((out / ev.SUMMARY_NAME).read_text())["fast"] is True
    with pytest.raises(ConfigError, match=r"fast: recorded True vs now False"):
        ev.evaluate(_config(out, resume=True, **learned), [0], runner=NoEpisodes())
    ev.evaluate(_config(out, resume=True, fast=True, **learned), [0], runner=NoEpisodes())  # the same value resumes

    plain = tmp_path / "plain"
    ev.evaluate(_config(plain, max_episodes=1, **learned), [0], runner=Succeeds())
    assert json.loads((plain / ev.RUN_NAME).read_text())["fast"] is False
    with pytest.raises(ConfigError, match=r"fast: recorded False vs now True"):
        ev.evaluate(_config(plain, resume=True, fast=True, **learned), [0], runner=NoEpisodes())


def test_a_run_json_from_before_fast_resumes_as_not_fast(policy_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "old"
    learned = {"policy": str(policy_dir), "device": "cuda", "trials": 2}
    ev.evaluate(_config(out, max_episodes=1, **learned), [0], runner=Succeeds())
    record = json.loads((out / ev.RUN_NAME).read_text())
    del record["fast"]
    (out / ev.RUN_NAME).write_text(json.dumps(record))
    ev.evaluate(_config(out, resume=True, **learned), [0], runner=NoEpisodes())
    (out / ev.RUN_NAME).write_text(json.dumps(record))  # rewritten by the resume: absent again
    with pytest.raises(ConfigError, match=r"fast: recorded False vs now True"):
        ev.evaluate(_config(out, resume=True, fast=True, **learned), [0], runner=NoEpisodes())


def test_the_policy_factory_of_a_fast_eval_is_fast(policy_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate's default factory passes fast=True on: with no CUDA it refuses instead of loading a slow policy."""
    factories = capture_policy_factories(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the config-time check sees a GPU ...
    ev.evaluate(_config(tmp_path / "fast", policy=str(policy_dir), fast=True), [0])  # default device
    ev.evaluate(_config(tmp_path / "plain", policy=str(policy_dir)), [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ... the worker that loads the policy does not
    fast_factory, plain_factory = factories
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        fast_factory()
    assert isinstance(plain_factory(), RSDPolicy)


@pytest.mark.parametrize("extra", [["--policy", "expert"], ["--device", "cpu"]])
def test_collect_fast_is_refused_before_anything_is_written(policy_dir: Path, tmp_path: Path, extra: list[str],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`rsd collect --fast` checks like `rsd eval --fast`: a scripted policy or a CPU device exits 1, no file."""
    out = tmp_path / "demos.hdf5"
    argv = ["collect", "--policy", str(policy_dir), "--episodes-per-task", "1", "--out", str(out), "--fast", *extra]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "ConfigError" in err and "--fast" in err
    assert not out.exists()


def test_fast_with_the_default_device_and_no_cuda_is_refused_before_anything_is_written(
        policy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        _config(tmp_path / "out", policy=str(policy_dir), fast=True)
    assert not (tmp_path / "out").exists()


def test_fast_plan_reads_what_fast_would_do_from_policy_json(policy_dir: Path, tmp_path: Path) -> None:
    """Greedy RSD on TinyBackbone: heads graphed, backbone untouched (no set_fast). A speculative RSD or an L1
    policy on TinyBackbone has nothing to speed up: refused from policy.json alone, and by `rsd eval --fast`
    before anything is written."""
    assert fast_plan(policy_dir) == FastPlan(graph_heads=True, backbone=False)
    speculative = tiny_rsd_policy(speculative=True).save_pretrained(tmp_path / "spec")
    l1 = tiny_l1_policy().save_pretrained(tmp_path / "l1")
    for directory, what in ((speculative, "decodes speculatively"), (l1, "'l1' policy")):
        with pytest.raises(ConfigError, match=f"nothing to speed up.*{what}.*TinyBackbone"):
            fast_plan(directory)
        with pytest.raises(ConfigError, match="nothing to speed up"):
            _config(tmp_path / "out", policy=str(directory), fast=True, device="cuda")
        with pytest.raises(ConfigError, match="nothing to speed up"):
            load_policy(directory, device="cuda", fast=True)  # refused before any weight is loaded onto cuda
    assert not (tmp_path / "out").exists()

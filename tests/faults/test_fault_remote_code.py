"""A policy folder cannot switch on trust_remote_code by itself: only `--trust-remote-code` (rsd eval / collect) or
`load_policy(..., trust_remote_code=True)` lets a backbone run its checkpoint's own Python code."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from rsd import errors
from rsd import eval as ev
from rsd.backbones import HFBackbone, TinyBackbone
from rsd.errors import ConfigError
from rsd.policy.factory import make_policy
from rsd.policy import RSDPolicy, load_policy
from rsd import collect
from tests._eval_stubs import capture_policy_factories
from tests.policy_factory import IMAGE, tiny_rsd_policy


def _evil_checkpoint(directory: Path, marker: Path) -> Path:
    """A Hugging Face folder whose config class is its own code; importing that code writes ``marker``."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "rsd_fault_remote", "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig"}}))
    (directory / "configuration_remote.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('the checkpoint ran its code')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class RemoteConfig(PretrainedConfig):\n    model_type = 'rsd_fault_remote'\n")
    return directory


def _policy_asking_for_remote_code(tmp_path: Path, checkpoint: Path) -> Path:
    policy = tiny_rsd_policy().save_pretrained(tmp_path / "policy")
    meta = json.loads((policy / "policy.json").read_text())
    meta["backbone"] = {"name": "hf", "kwargs": {"path_or_id": str(checkpoint), "trust_remote_code": True}}
    (policy / "policy.json").write_text(json.dumps(meta))
    return policy


@pytest.fixture()
def recorded_hf_loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """HFBackbone.load_spec records its kwargs and returns a tiny backbone (no transformers needed)."""
    calls: list[dict[str, Any]] = []

    def load_spec(cls: type, kwargs: dict[str, Any], directory: Path, *, device: Any = "cpu") -> TinyBackbone:
        calls.append(dict(kwargs))
        return TinyBackbone(hidden_dim=32, image_size=IMAGE, width=16)

    monkeypatch.setattr(HFBackbone, "load_spec", classmethod(load_spec))
    return calls


def test_policy_json_alone_does_not_run_the_checkpoints_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    policy = _policy_asking_for_remote_code(tmp_path, _evil_checkpoint(tmp_path / "ckpt", marker))
    with pytest.raises(ConfigError, match=r"trust_remote_code.*--trust-remote-code") as info:
        load_policy(policy)
    assert isinstance(info.value, errors.RemoteCodeNotAllowedError)
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        make_policy(str(policy), device="cpu")
    assert not marker.exists()


def test_the_explicit_flag_passes_trust_remote_code_on(tmp_path: Path,
                                                       recorded_hf_loads: list[dict[str, Any]]) -> None:
    policy = _policy_asking_for_remote_code(tmp_path, tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        load_policy(policy)
    assert recorded_hf_loads == []  # refused before the backbone is touched
    assert isinstance(load_policy(policy, trust_remote_code=True), RSDPolicy)
    assert isinstance(make_policy(str(policy), device="cpu", trust_remote_code=True), RSDPolicy)
    assert [c["trust_remote_code"] for c in recorded_hf_loads] == [True, True]


def test_a_truthy_non_bool_request_is_refused_too(tmp_path: Path, recorded_hf_loads: list[dict[str, Any]]) -> None:
    policy = _policy_asking_for_remote_code(tmp_path, tmp_path / "ckpt")
    meta = json.loads((policy / "policy.json").read_text())
    meta["backbone"]["kwargs"]["trust_remote_code"] = "yes"
    (policy / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        load_policy(policy)
    assert recorded_hf_loads == []


def test_rsd_eval_refuses_without_the_flag_and_passes_it_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               recorded_hf_loads: list[dict[str, Any]]) -> None:
    policy = _policy_asking_for_remote_code(tmp_path, tmp_path / "ckpt")
    config = dict(suite="libero_spatial", policy=str(policy), trials=1, render=False, video="none",
                  progress=False, plot=False, device="cpu")
    with pytest.raises(ConfigError, match="--trust-remote-code"):  # the default runner loads the policy
        ev.evaluate(ev.EvalConfig(out=tmp_path / "refused", **config), [0])
    assert not (tmp_path / "refused" / ev.RUN_NAME).exists()
    factories = capture_policy_factories(monkeypatch)
    ev.evaluate(ev.EvalConfig(out=tmp_path / "trusted", trust_remote_code=True, **config), [0])
    assert isinstance(factories[0](), RSDPolicy) and recorded_hf_loads[-1]["trust_remote_code"] is True


@pytest.mark.parametrize("module", [ev, collect], ids=["eval", "collect"])
def test_the_cli_flag_exists_and_is_off_by_default(module: Any) -> None:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    base = ["--policy", "p", "--out", "o"] + (["--episodes-per-task", "1"] if module is collect else [])
    assert parser.parse_args(base).trust_remote_code is False
    assert parser.parse_args(base + ["--trust-remote-code"]).trust_remote_code is True

"""`rsd eval --out`: a directory that is not an rsd run is never written into (its summary.json, run.json and
summary.png would be overwritten), an empty --out is refused, an unwritable one is a typed error, and a failed
start (the policy does not load) leaves no run.json to block the next start."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from rsd import cli
from rsd import eval as ev
from rsd.errors import ConfigError, RSDError
from tests._eval_stubs import Succeeds, capture_policy_factories
from tests.policy_factory import tiny_rsd_policy


def _config(out: Any, **kw: Any) -> ev.EvalConfig:
    base: dict[str, Any] = dict(suite="libero_spatial", policy="expert", out=out, trials=1, render=False,
                                video="none", progress=False, plot=False)
    base.update(kw)
    return ev.EvalConfig(**base)




def test_an_existing_directory_that_is_not_an_rsd_run_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "my_project"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not an rsd eval run"):
        ev.evaluate(_config(out), [0], runner=Succeeds())
    assert sorted(os.listdir(out)) == ["notes.txt", "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == {"mine": True}


def test_the_cli_refuses_a_foreign_out_before_starting(tmp_path: Path, no_libero: None,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "summary.png").write_bytes(b"a user's plot")
    assert cli.main(["eval", "--policy", "expert", "--out", str(tmp_path), "--no-render"]) == 1
    assert "not an rsd eval run" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["summary.png"]


def test_an_empty_out_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_libero: None,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--out is empty"):
        _config("")
    assert cli.main(["eval", "--policy", "expert", "--out", "", "--no-render"]) == 1
    assert "--out is empty" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_new_empty_and_rsd_run_directories_are_accepted(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    ev.evaluate(_config(empty), [0], runner=Succeeds())
    ev.evaluate(_config(empty, resume=True, trials=2), [0], runner=Succeeds())  # an rsd run: resumes
    ev.evaluate(_config(tmp_path / "new" / "deeper"), [0], runner=Succeeds())
    assert ev.is_run_dir(empty) and not ev.is_run_dir(tmp_path)


def test_an_out_that_is_a_file_or_cannot_be_written_is_a_typed_error(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        ev.evaluate(_config(blocker), [0], runner=Succeeds())
    with pytest.raises(ConfigError, match="cannot create --out"):
        ev.evaluate(_config(blocker / "sub"), [0], runner=Succeeds())
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # a read-only directory (root ignores chmod)
    with pytest.raises(ConfigError, match="cannot write to --out"):
        ev.evaluate(_config(tmp_path / "ro"), [0], runner=Succeeds())


def _broken_policy(directory: Path) -> Path:
    policy = tiny_rsd_policy().save_pretrained(directory)
    head = policy / "head.safetensors"
    head.write_bytes(head.read_bytes()[:100])  # a copy cut short
    return policy


def test_a_policy_that_fails_to_load_leaves_no_run_json(tmp_path: Path) -> None:
    policy = _broken_policy(tmp_path / "policy")
    out = tmp_path / "eval"
    with pytest.raises(RSDError, match="head.safetensors"):
        ev.evaluate(_config(out, policy=str(policy), device="cpu"), [0])  # the default runner loads the policy
    assert not (out / ev.RUN_NAME).exists() and not (out / ev.SUMMARY_NAME).exists()
    # fixed (other files, so another content hash): a --resume of that out starts afresh, and so does a new start
    tiny_rsd_policy(seed=3).save_pretrained(policy)
    ev.evaluate(_config(out, policy=str(policy), device="cpu", resume=True), [0], runner=Succeeds())
    assert json.loads((out / ev.RUN_NAME).read_text())["policy"] == str(policy)


def test_a_run_json_with_no_episode_recorded_does_not_block_resume(tmp_path: Path) -> None:
    """A run.json from a start that failed (left by earlier rsd versions) binds nothing."""
    out = tmp_path / "eval"
    out.mkdir()
    stale = _config(out, policy="expert-rfsq", seed=1).run_record()
    (out / ev.RUN_NAME).write_text(json.dumps(stale))
    ev.evaluate(_config(out, policy="expert", resume=True), [0], runner=Succeeds())
    assert json.loads((out / ev.RUN_NAME).read_text())["policy"] == "expert"


def test_run_json_is_written_once_the_policy_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An eval cut before its first episode finished (Ctrl-C) still leaves an rsd run dir that resumes."""
    capture_policy_factories(monkeypatch)  # the runner ends at once with no episode, as after Ctrl-C
    out = tmp_path / "eval"
    ev.evaluate(_config(out), [0])
    assert ev.is_run_dir(out)

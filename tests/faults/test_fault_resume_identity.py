"""`rsd eval --resume` compares what stands behind --policy (a content hash of its files) and the device, not the
--policy text: changed files or another device are refused naming what changed; the same files reached by a
relative or an absolute path resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from rsd import errors
from rsd import eval as ev
from rsd.errors import ConfigError
from rsd.policy.factory import DEFAULT_TOKENIZER_DIR
from rsd.tokenizer import RFSQTokenizer
from tests._eval_stubs import Succeeds
from tests.policy_factory import tiny_rsd_policy


def _config(out: Path, policy: str, **kw: Any) -> ev.EvalConfig:
    base: dict[str, Any] = dict(suite="libero_spatial", policy=policy, out=out, trials=2, render=False,
                                video="none", progress=False, plot=False)
    base.update(kw)
    return ev.EvalConfig(**base)


def _first_half(out: Path, policy: str, **kw: Any) -> None:
    """One of the two episodes recorded: a run that --resume must continue with the same policy."""
    ev.evaluate(_config(out, policy, max_episodes=1, **kw), [0], runner=Succeeds())


def test_resume_refuses_a_policy_directory_whose_files_changed(tmp_path: Path) -> None:
    policy = tiny_rsd_policy(seed=0).save_pretrained(tmp_path / "policy")
    out = tmp_path / "eval"
    _first_half(out, str(policy), device="cpu")
    tiny_rsd_policy(seed=1).save_pretrained(policy)  # retrained in place: same path, other weights
    with pytest.raises(ConfigError, match=r"policy content") as info:
        ev.evaluate(_config(out, str(policy), resume=True, device="cpu"), [0], runner=Succeeds())
    assert isinstance(info.value, errors.ResumeMismatchError)
    assert len((out / ev.RESULTS_NAME).read_text().splitlines()) == 1  # nothing was mixed in


def test_resume_refuses_another_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = tiny_rsd_policy().save_pretrained(tmp_path / "policy")
    out = tmp_path / "eval"
    _first_half(out, str(policy), device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: the default device is cuda
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ConfigError, match=r"device \(--device\): recorded 'cpu' vs now 'cuda:0'"):
        ev.evaluate(_config(out, str(policy), resume=True), [0], runner=Succeeds())


def test_cuda_and_cuda_0_are_the_same_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from rsd.policy.factory import policy_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert policy_device("some/dir", "cuda") == policy_device("some/dir", "cuda:0") == policy_device("some/dir", None)
    assert policy_device("some/dir", "cuda:1") == "cuda:1" and policy_device("expert", "cuda") is None


def test_the_same_policy_by_relative_and_absolute_path_resumes(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_rsd_policy().save_pretrained(tmp_path / "policy")
    out = tmp_path / "eval"
    _first_half(out, str((tmp_path / "policy").resolve()), device="cpu")
    monkeypatch.chdir(tmp_path)
    runner = Succeeds()
    ev.evaluate(_config(out, "policy", resume=True, device="cpu"), [0], runner=runner)
    ev.evaluate(_config(out, "./policy/", resume=True, device="cpu"), [0], runner=Succeeds())
    assert [k.trial for k in runner.ran] == [1]


def test_resume_refuses_an_expert_rfsq_tokenizer_retrained_in_place(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tok"
    shutil.copytree(DEFAULT_TOKENIZER_DIR, tokenizer)
    out = tmp_path / "eval"
    _first_half(out, f"expert-rfsq:{tokenizer}")
    # the packaged tokenizer by its built-in name is the same content: it resumes
    ev.evaluate(_config(out, "expert-rfsq", resume=True, max_episodes=1), [0], runner=Succeeds())
    shutil.rmtree(out)
    _first_half(out, f"expert-rfsq:{tokenizer}")
    torch.manual_seed(1)
    saved = json.loads((tokenizer / "tokenizer.json").read_text())["config"]
    RFSQTokenizer(**saved).save_pretrained(tokenizer)  # retrained: same sizes, other weights
    with pytest.raises(ConfigError, match="policy content"):
        ev.evaluate(_config(out, f"expert-rfsq:{tokenizer}", resume=True), [0], runner=Succeeds())


def test_resume_refuses_an_openvla_checkpoint_whose_shard_changed_at_the_same_size(tmp_path: Path) -> None:
    """A shard's name, size and mtime would not see this: its bytes are hashed."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "dataset_statistics.json").write_text("{}")
    (ckpt / "model-00001-of-00001.safetensors").write_bytes(b"\x00" * 4096)
    (ckpt / "action_head--150000_checkpoint.pt").write_bytes(b"head")
    (ckpt / "README.md").write_text("docs are not weights")
    spec = f"openvla-oft:{ckpt}@libero_spatial_no_noops"
    out = tmp_path / "eval"
    _first_half(out, spec, device="cpu")
    (ckpt / "README.md").write_text("edited docs resume")
    ev.evaluate(_config(out, spec, resume=True, device="cpu"), [0], runner=Succeeds())
    shutil.rmtree(out)
    _first_half(out, spec, device="cpu")
    shard = ckpt / "model-00001-of-00001.safetensors"
    stat = shard.stat()
    shard.write_bytes(b"\x00" * 4095 + b"\x01")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ConfigError, match="policy content"):
        ev.evaluate(_config(out, spec, resume=True, device="cpu"), [0], runner=Succeeds())
    with pytest.raises(ConfigError, match=r"policy statistics key"):  # another @KEY is another policy
        ev.evaluate(_config(out, f"openvla-oft:{ckpt}@libero_object_no_noops", resume=True, device="cpu"), [0],
                    runner=Succeeds())


def test_a_run_json_without_the_policy_hash_is_not_resumed_blindly(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    _first_half(out, "expert")
    record = json.loads((out / ev.RUN_NAME).read_text())
    for key in ("policy_kind", "policy_unnorm_key", "policy_content", "device"):
        del record[key]
    (out / ev.RUN_NAME).write_text(json.dumps(record))  # what an older rsd wrote
    with pytest.raises(ConfigError, match="older rsd"):
        ev.evaluate(_config(out, "expert", resume=True), [0], runner=Succeeds())


def test_the_expert_identity_covers_every_sim_module_it_imports(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripted expert is its code: a controller or helper module experts.py imports (here through another
    one) is part of its hash, so --resume notices when it changes; a sim module it does not import is not."""
    from rsd.policy import identity

    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "experts.py").write_text("from rsd.sim import control\nfrom rsd.sim.task_plans import PLANS\n"
                                    "import rsd.sim.geometry\nfrom rsd.policy.protocol import ActionChunk\n")
    (sim / "control.py").write_text("from .gains import K\n")
    (sim / "gains.py").write_text("K = 1\n")
    (sim / "task_plans.py").write_text("PLANS = {}\n")
    (sim / "geometry.py").write_text("")
    (sim / "libero.py").write_text("")  # the env: not the expert
    assert identity.expert_sources(sim) == [Path(n) for n in ("control.py", "experts.py", "gains.py", "geometry.py",
                                                              "task_plans.py")]
    monkeypatch.setattr(identity, "_SIM_DIR", sim)
    before = identity.policy_identity("expert")["content"]
    (sim / "libero.py").write_text("# edited\n")
    assert identity.policy_identity("expert")["content"] == before
    (sim / "gains.py").write_text("K = 2\n")  # the controller's gain changed: another expert
    assert identity.policy_identity("expert")["content"] != before
    real = identity.expert_sources()
    assert {Path("experts.py"), Path("task_plans.py")} <= set(real)


def test_a_broken_policy_json_is_named_when_the_run_is_identified(tmp_path: Path) -> None:
    """policy_identity reads policy.json with the strict reader: no silent 'not a policy' for a cut file."""
    from rsd.errors import CheckpointMismatchError
    from rsd.policy.identity import policy_identity

    policy = tiny_rsd_policy().save_pretrained(tmp_path / "policy")
    (policy / "policy.json").write_text('{"format": 1, "kind": "rsd"')  # cut
    with pytest.raises(CheckpointMismatchError, match="policy.json"):
        policy_identity(str(policy))

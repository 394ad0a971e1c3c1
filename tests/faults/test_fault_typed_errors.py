"""User errors that surfaced as raw tracebacks now raise typed errors naming the file or field and the fix, and the
`rsd` command prints them and exits 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from rsd import cli
from rsd import eval as ev
from rsd.config import RSDConfig
from rsd.errors import CheckpointMismatchError, ConfigError
from rsd.policy import load_policy
from rsd.tokenizer import RFSQTokenizer
from tests.policy_factory import tiny_rsd_policy


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_rsd_policy().save_pretrained(tmp_path_factory.mktemp("policy") / "rsd")


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


@pytest.mark.parametrize("name", ["head.safetensors", "draft.safetensors", "tokenizer/tokenizer.safetensors",
                                  "backbone.safetensors"])
@pytest.mark.parametrize("cut", [0, 100], ids=["empty", "truncated"])
def test_a_cut_safetensors_file_is_named(saved_policy: Path, tmp_path: Path, name: str, cut: int) -> None:
    policy = _copy(saved_policy, tmp_path / "p")
    path = policy / name
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointMismatchError, match=rf"{path}.*not a readable safetensors file.*again"):
        load_policy(policy)


@pytest.mark.parametrize("text,problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_a_policy_json_that_is_not_an_object_is_named(saved_policy: Path, tmp_path: Path, text: Any,
                                                      problem: str) -> None:
    policy = _copy(saved_policy, tmp_path / "p")
    path = policy / "policy.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointMismatchError, match=rf"{path}.*{problem}"):
        load_policy(policy)


@pytest.mark.parametrize("key", ["config", "backbone", "action_stats", "kind"])
def test_a_policy_json_missing_a_key_names_it(saved_policy: Path, tmp_path: Path, key: str) -> None:
    policy = _copy(saved_policy, tmp_path / "p")
    meta = json.loads((policy / "policy.json").read_text())
    del meta[key]
    (policy / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match=rf"policy.json lacks \['{key}'\]"):
        load_policy(policy)


@pytest.mark.parametrize("field,value", [("hidden_dim", 10**9), ("head_width", 0), ("latent_dim", -4),
                                         ("num_levels", 1), ("num_layers", 10**6), ("chunk_len", 2.0)])
def test_absurd_config_sizes_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"`{field}`"):
        RSDConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"`{field}`"):
        RSDConfig.from_dict({field: value})


def test_a_config_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ConfigError, match="RSDConfig is a JSON object"):
        RSDConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_a_policy_json_with_an_absurd_width_is_refused_before_allocating(saved_policy: Path, tmp_path: Path) -> None:
    policy = _copy(saved_policy, tmp_path / "p")
    meta = json.loads((policy / "policy.json").read_text())
    meta["config"]["head_width"] = 10**9
    (policy / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="`head_width` must be an int in"):
        load_policy(policy)


@pytest.mark.parametrize("field,value", [("chunk_len", 10**6), ("num_levels", 257)])
def test_absurd_tokenizer_sizes_name_the_field(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"RFSQTokenizer `{field}`"):
        RFSQTokenizer(**{field: value})


def test_invalid_utf8_in_the_results_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / ev.RESULTS_NAME
    path.write_bytes(b'{"suite": "libero_spatial"}\n{"task_name": "\xff\xfe"}\n')
    with pytest.raises(ConfigError, match=rf"{ev.RESULTS_NAME}:1 is not a valid episode record"):
        ev.ResultsFile(path).load()
    path.write_bytes(b'\xff\n')
    with pytest.raises(ConfigError, match=":1 is not a valid episode record"):
        ev.ResultsFile(path).load()




@pytest.mark.parametrize("device", ["cuda", "cuda:0", "tpu7"])
def test_a_device_this_machine_lacks_is_refused_at_config_time(tmp_path: Path, device: str, no_libero: None,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device"):
        ev.EvalConfig(suite="libero_spatial", policy="expert", out=tmp_path / "o", device=device)
    for argv in (["eval", "--policy", "expert", "--out", str(tmp_path / "e"), "--no-render", "--device", device],
                 ["collect", "--episodes-per-task", "1", "--out", str(tmp_path / "c.hdf5"), "--device", device]):
        assert cli.main(argv) == 1
        assert "--device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", [["--iters", "0"], ["--warmup", "-1"], ["--threads", "0"]])
def test_bench_refuses_a_count_it_cannot_time(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--config", "tiny", "--warmup", "0", "--iters", "1", *option]) == 1
    assert option[0] in capsys.readouterr().err


@pytest.mark.parametrize("victim", ["shard", "component"])
def test_a_cut_openvla_checkpoint_file_is_named(tmp_path: Path, victim: str) -> None:
    """A truncated OpenVLA-OFT shard or component .pt is a CorruptCheckpointError naming the file."""
    import torch

    from rsd.backbones.openvla_checkpoint import load_oft_state_dict
    from rsd.errors import CorruptCheckpointError
    from tests._openvla_tiny import build_tiny_oft_checkpoint

    ckpt = build_tiny_oft_checkpoint(tmp_path / "openvla-7b-oft-finetuned-libero-spatial")
    pattern = "model-*.safetensors" if victim == "shard" else "action_head--*_checkpoint.pt"
    path = sorted(ckpt.glob(pattern))[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=path.name):
        load_oft_state_dict(ckpt, device=torch.device("cpu"))


@pytest.mark.parametrize("victim", ["config.json", "dataset_statistics.json", "preprocessor_config.json"])
@pytest.mark.parametrize("text", ['{"cut', "[1, 2]"], ids=["cut", "not_an_object"])
def test_a_cut_openvla_checkpoint_json_is_named(tmp_path: Path, victim: str, text: str) -> None:
    """A cut or foreign JSON file of an OpenVLA-OFT checkpoint is a CheckpointMismatchError naming the file, not a
    bare JSONDecodeError / AttributeError from deep inside the load."""
    from rsd.backbones.openvla import OpenVLAOFTBackbone
    from rsd.errors import CheckpointMismatchError
    from tests._openvla_tiny import build_tiny_oft_checkpoint

    ckpt = build_tiny_oft_checkpoint(tmp_path / "openvla-7b-oft-finetuned-libero-spatial")
    (ckpt / victim).write_text(text)
    with pytest.raises(CheckpointMismatchError, match=victim):
        OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_spatial", device="cpu", dtype="float32")

"""Inputs that were silently turned into something else, or accepted until they failed far away with a wrong hint:
`--chunk-len 0`, a tokenizer for another action size, `--seed` out of range, `mask: ["false"]`, OpenVLA shard names
leaving the checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rsd import cli
from rsd import eval as ev
from rsd.action_space import ActionSpace
from rsd.backbones.openvla_checkpoint import weight_files
from rsd.errors import CheckpointMismatchError, ConfigError, RSDError
from rsd.normalize import NormStats, load_dataset_statistics
from rsd.policy.factory import make_policy
from rsd.sim.demos import DemoWriter
from rsd.tokenizer import RFSQTokenizer
from rsd.train.tokenizer_cli import train_tokenizer


def test_chunk_len_0_is_refused_not_replaced_by_8(tmp_path: Path) -> None:
    pytest.importorskip("h5py", reason="h5py is required (install rsd[sim])")
    demos = tmp_path / "demos.hdf5"
    rng = np.random.default_rng(0)
    with DemoWriter(demos) as writer:
        for _ in range(3):
            writer.add(actions=rng.uniform(-1, 1, (20, 7)), obs={}, states=rng.normal(size=(20, 4)),
                       robot_states=rng.normal(size=(20, 9)), problem_info={"language_instruction": "x"})
    with pytest.raises(ConfigError, match="chunk_len"):
        train_tokenizer([demos], tmp_path / "tok", steps=1, chunk_len=0, progress=False)
    assert not (tmp_path / "tok").exists()


def test_a_tokenizer_for_another_action_dim_is_refused_when_it_loads(tmp_path: Path) -> None:
    directory = tmp_path / "tok6"
    RFSQTokenizer(chunk_len=8, action_dim=6, latent_dim=4, num_layers=2, num_levels=5, width=8).save_pretrained(directory)
    ActionSpace.fit(np.random.default_rng(0).uniform(-1, 1, (64, 7))).save(directory)
    with pytest.raises(CheckpointMismatchError, match=r"action_dim 6.*action_dim 7"):
        make_policy(f"expert-rfsq:{directory}")


@pytest.mark.parametrize("seed", [-1, 2**32, True, 1.5], ids=["negative", "too-big", "bool", "float"])
def test_eval_seed_is_validated_in_the_config(tmp_path: Path, seed: Any) -> None:
    with pytest.raises(ConfigError, match="--seed"):
        ev.EvalConfig(suite="libero_spatial", policy="expert", out=tmp_path, seed=seed)
    ev.EvalConfig(suite="libero_spatial", policy="expert", out=tmp_path, seed=2**32 - 1)




def test_collect_seed_is_refused_before_libero(tmp_path: Path, no_libero: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["collect", "--episodes-per-task", "1", "--out", str(tmp_path / "d.hdf5"), "--seed", "-1"]
    assert cli.main(argv) == 1
    assert "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("mask", [["false"] * 7, [1, 1, 1, 1, 1, 1, 0], ["true"] * 6 + [False]],
                         ids=["strings", "ints", "mixed"])
def test_a_mask_of_non_booleans_is_refused(tmp_path: Path, mask: list) -> None:
    data = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": mask}
    with pytest.raises(ConfigError, match="mask"):
        NormStats.from_dict(data)
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps({"libero_spatial_no_noops": {"action": data}}))
    with pytest.raises(ConfigError, match="mask"):
        load_dataset_statistics(path)
    assert NormStats.from_dict({**data, "mask": [True] * 6 + [False]}).mask.tolist() == [True] * 6 + [False]


@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/../../x.safetensors", "/etc/x.safetensors", ""])
def test_openvla_shard_names_must_stay_in_the_checkpoint_folder(tmp_path: Path, shard: str) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": shard}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointMismatchError, match="outside"):
        weight_files(ckpt)


def test_openvla_shards_inside_the_folder_are_listed(tmp_path: Path) -> None:
    index = {"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "sub/../model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_files(tmp_path) == [tmp_path / "model-00002-of-00002.safetensors",
                                       tmp_path / "sub/../model-00001-of-00002.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(RSDError, match="weight_map"):
        weight_files(tmp_path)

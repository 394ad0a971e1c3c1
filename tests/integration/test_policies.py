"""RSDPolicy and L1Policy end to end over TinyBackbone and a tiny Hugging Face VLM: save -> load -> identical."""

import numpy as np
import pytest

from policy_factory import fake_observation, tiny_l1_policy, tiny_rsd_policy
from rsd.observation import STATE
from rsd.policy import load_policy

pytestmark = pytest.mark.integration

INSTR = "put the cream cheese in the basket"


@pytest.mark.parametrize("make", [tiny_rsd_policy, tiny_l1_policy], ids=["rsd", "l1"])
def test_tiny_backbone_save_load_identical(tmp_path, make):
    policy = make()
    obs = fake_observation(7)
    before = policy.predict_chunk(obs, INSTR).actions
    policy.save_pretrained(tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy")
    assert type(loaded) is type(policy)
    np.testing.assert_array_equal(loaded.predict_chunk(obs, INSTR).actions, before)
    # the policy looks at its inputs: another observation, or another instruction, changes the chunk (random RSD
    # heads give nearby observations the same codes, so the other one is far: other images, proprio moved by 1)
    other = {**fake_observation(8), STATE: obs[STATE] + 1.0}
    assert not np.array_equal(loaded.predict_chunk(other, INSTR).actions, before)
    assert not np.array_equal(loaded.predict_chunk(obs, "open the drawer").actions, before)


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    from _hf_tiny import build_tiny_hf_vlm

    return build_tiny_hf_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.mark.parametrize("make", [tiny_rsd_policy, tiny_l1_policy], ids=["rsd", "l1"])
def test_hf_backbone_save_load_identical(tmp_path, tiny_vlm_dir, make):
    from rsd.backbones import HFBackbone

    backbone = HFBackbone.from_pretrained(tiny_vlm_dir)
    policy = make(backbone)
    obs = fake_observation(11)
    before = policy.predict_chunk(obs, INSTR)
    assert before.info["hidden_shape"] == [1, backbone.hidden_dim]
    policy.save_pretrained(tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy")
    assert type(loaded) is type(policy) and type(loaded.backbone) is HFBackbone
    np.testing.assert_array_equal(loaded.predict_chunk(obs, INSTR).actions, before.actions)

"""``rsd.policy.factory.make_policy`` for ``openvla-oft:PATH[@UNNORM_KEY]`` on a tiny OpenVLA-OFT checkpoint
built locally (tests/_openvla_tiny.py), and the suite it gets from ``rsd eval``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rsd import eval as ev
from rsd.backbones.openvla import OpenVLAOFTBackbone
from rsd.policy.oft import OFTL1Policy
from rsd.errors import (
    CheckpointNotFoundError,
    ConfigError,
    UnknownUnnormKeyError,
    WrongBaseModelError,
)
from rsd.policy.factory import POLICY_NAMES, make_policy
from tests._eval_stubs import capture_policy_factories
from tests._openvla_tiny import (
    INSTRUCTIONS,
    build_tiny_oft_checkpoint,
    tiny_observation,
)

pytestmark = pytest.mark.unit

SPATIAL = "openvla-7b-oft-finetuned-libero-spatial"  # stats key libero_spatial_no_noops


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_oft_checkpoint(tmp_path_factory.mktemp("ckpt") / SPATIAL)


@pytest.fixture(scope="module")
def direct_actions(checkpoint: Path) -> np.ndarray:
    """OFT's pipeline built by hand, the reference the registry must reproduce: actions [C, A] = [8, 7]."""
    policy = OFTL1Policy(OpenVLAOFTBackbone.from_pretrained(checkpoint, "libero_spatial", device="cpu"))
    return policy.predict_chunk(tiny_observation(3), INSTRUCTIONS[0]).actions


def test_openvla_oft_spec_is_ofts_own_pipeline(checkpoint: Path, direct_actions: np.ndarray) -> None:
    policy = make_policy(f"openvla-oft:{checkpoint}", suite="libero_spatial", device="cpu")
    assert isinstance(policy, OFTL1Policy)
    assert (policy.backbone.suite, policy.backbone.unnorm_key) == ("libero_spatial", "libero_spatial_no_noops")
    policy.reset()
    chunk = policy.predict_chunk(tiny_observation(3), INSTRUCTIONS[0])
    assert chunk.actions.shape == (8, 7) and chunk.actions.dtype == np.float32
    assert direct_actions.shape == (8, 7) and np.ptp(direct_actions[:, :6]) > 0  # not a constant chunk
    np.testing.assert_array_equal(chunk.actions, direct_actions)
    assert chunk.info["unnorm_key"] == "libero_spatial_no_noops"


def test_wrong_suite_is_refused_with_the_command_line_override(checkpoint: Path) -> None:
    with pytest.raises(WrongBaseModelError, match=r"libero_object.*--policy openvla-oft:.*@UNNORM_KEY"):
        make_policy(f"openvla-oft:{checkpoint}", suite="libero_object", device="cpu")


def test_unnorm_key_suffix_runs_a_checkpoint_on_another_suite_on_purpose(checkpoint: Path,
                                                                         direct_actions: np.ndarray) -> None:
    policy = make_policy(f"openvla-oft:{checkpoint}@libero_spatial_no_noops", suite="libero_object", device="cpu")
    assert (policy.backbone.suite, policy.backbone.unnorm_key) == ("libero_object", "libero_spatial_no_noops")
    # same weights, same statistics: the suite only gates loading, the actions are the spatial ones
    np.testing.assert_array_equal(policy.predict_chunk(tiny_observation(3), INSTRUCTIONS[0]).actions, direct_actions)
    with pytest.raises(UnknownUnnormKeyError, match="libero_spatial_no_noops"):  # the key must exist
        make_policy(f"openvla-oft:{checkpoint}@bridge_orig", suite="libero_object", device="cpu")


@pytest.mark.parametrize("key", ["libero_object", "libero_object_no_noops"])
def test_the_suites_own_key_keeps_the_guard_rails_on(checkpoint: Path, key: str) -> None:
    """@KEY overrides the suite check only for another dataset's statistics: naming the suite's own key on a
    checkpoint fine-tuned for another suite is still refused as the wrong model."""
    with pytest.raises(WrongBaseModelError, match=r"libero_spatial.*not 'libero_object'"):
        make_policy(f"openvla-oft:{checkpoint}@{key}", suite="libero_object", device="cpu")


def test_a_directory_whose_name_holds_an_at_sign_is_a_path(checkpoint: Path, tmp_path: Path) -> None:
    link = tmp_path / "oft@step150000"
    link.symlink_to(checkpoint, target_is_directory=True)
    policy = make_policy(f"openvla-oft:{link}", suite="libero_spatial", device="cpu")
    assert policy.backbone.unnorm_key == "libero_spatial_no_noops"


def test_missing_checkpoint_and_missing_suite_raise(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointNotFoundError, match=rf"{missing} does not exist.*hf download .*libero-goal"):
        make_policy(f"openvla-oft:{missing}", suite="libero_goal", device="cpu")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):  # a key does not make it a path
        make_policy(f"openvla-oft:{missing}@libero_goal", suite="libero_goal", device="cpu")
    with pytest.raises(ConfigError, match="pass suite="):
        make_policy(f"openvla-oft:{missing}", device="cpu")
    for bare in ("openvla-oft", "openvla-oft:", "openvla-oft:@libero_goal"):
        with pytest.raises(ConfigError, match="needs a checkpoint directory"):
            make_policy(bare, suite="libero_goal", device="cpu")


def test_unknown_spec_lists_openvla_oft() -> None:
    assert "openvla-oft:PATH" in POLICY_NAMES
    with pytest.raises(ConfigError, match=r"Known: .*openvla-oft:PATH"):
        make_policy("openvla", suite="libero_spatial")


def test_rsd_eval_passes_its_suite_to_the_policy(checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    factories = capture_policy_factories(monkeypatch)
    for suite in ("libero_spatial", "libero_object"):
        config = ev.EvalConfig(suite=suite, policy=f"openvla-oft:{checkpoint}", out=tmp_path / suite, trials=1,
                               render=False, video="none", progress=False, plot=False, device="cpu")
        ev.evaluate(config, [0])
    spatial, object_ = factories
    assert spatial().backbone.suite == "libero_spatial"
    with pytest.raises(WrongBaseModelError, match="libero_object"):
        object_()


def test_fast_openvla_oft_on_cpu_is_refused_before_loading(checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match=r"--fast .*needs a CUDA device.*--device cuda"):
        make_policy(f"openvla-oft:{checkpoint}", suite="libero_spatial", device="cpu", fast=True)


def test_no_center_crop_reaches_the_backbone_and_changes_what_the_model_sees(checkpoint: Path,
                                                                             direct_actions: np.ndarray) -> None:
    policy = make_policy(f"openvla-oft:{checkpoint}", suite="libero_spatial", device="cpu", center_crop=False)
    assert policy.backbone.center_crop is False
    chunk = policy.predict_chunk(tiny_observation(3), INSTRUCTIONS[0])
    assert chunk.info["center_crop"] is False
    assert not np.array_equal(chunk.actions, direct_actions)  # uncropped pixels, other actions
    assert make_policy(f"openvla-oft:{checkpoint}", suite="libero_spatial", device="cpu").backbone.center_crop


@pytest.mark.parametrize("spec", ["expert", "expert-rfsq"])
def test_no_center_crop_is_refused_where_it_cannot_apply(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--no-center-crop"):
        make_policy(spec, suite="libero_spatial", center_crop=False)
    with pytest.raises(ConfigError, match="--no-center-crop"):
        ev.EvalConfig(suite="libero_spatial", policy=spec, out=tmp_path / "x", center_crop=False)


def test_the_crop_setting_is_recorded_in_run_json_and_resume_checks_it(checkpoint: Path, tmp_path: Path) -> None:
    from rsd.errors import ResumeMismatchError
    from rsd.eval.rundir import check_run_record, write_json_atomic

    spec = f"openvla-oft:{checkpoint}"
    cropped = ev.EvalConfig(suite="libero_spatial", policy=spec, out=tmp_path / "r", device="cpu")
    uncropped = ev.EvalConfig(suite="libero_spatial", policy=spec, out=tmp_path / "r", device="cpu",
                              center_crop=False, resume=True)
    assert cropped.run_record()["policy_center_crop"] is True
    assert uncropped.run_record()["policy_center_crop"] is False
    assert ev.EvalConfig(suite="libero_spatial", policy="expert", out=tmp_path / "e").run_record()["policy_center_crop"] is None
    path = tmp_path / "run.json"
    write_json_atomic(path, cropped.run_record())
    with pytest.raises(ResumeMismatchError, match="centre crop"):
        check_run_record(path, uncropped.run_record(), resume=True, has_records=True)
    check_run_record(path, cropped.run_record(), resume=True, has_records=True)

"""The two bounds normalizations (OpenVLA-OFT's BOUNDS_Q99 and BOUNDS), how they travel with an action space and
a saved policy, and the clipping report that tells which task's motions a normalization makes unreachable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rsd.action_space import ActionSpace
from rsd.errors import CheckpointMismatchError, ConfigError, ShapeError
from rsd.normalize import BoundsNormalizer, BoundsQ99Normalizer, NormStats
from rsd.policy import L1Policy, RSDPolicy
from rsd.sim.demos import Demo
from rsd.train.clipping import clipping_by_task, clipping_warnings
from tests.policy_factory import fake_observation, tiny_l1_policy, tiny_rsd_policy

pytestmark = pytest.mark.unit

MASK = [True] * 6 + [False]
STATS = NormStats(q01=[-0.5] * 6 + [0.0], q99=[0.5] * 6 + [1.0], mask=MASK,
                  min=[-1.0, -1.0, -1.0, -0.1, -0.2, -0.05, 0.0], max=[1.0, 1.0, 1.0, 0.1, 0.2, 0.7, 1.0])


def test_bounds_uses_min_max_and_bounds_q99_the_quantiles() -> None:
    top = np.ones((1, 7), np.float32)  # normalized +1 in every dim
    assert BoundsNormalizer(STATS, "bounds").unnormalize(top)[0, :6] == pytest.approx(STATS.max[:6])
    assert BoundsQ99Normalizer(STATS).unnormalize(top)[0, :6] == pytest.approx(STATS.q99[:6])
    x = np.array([[0.3, -0.9, 0.0, 0.05, -0.1, 0.6, 1.0]])
    for kind in ("bounds", "bounds_q99"):
        norm = BoundsNormalizer(STATS, kind)
        assert norm.unnormalize(norm.normalize(x))[0, 6] == 1.0  # the gripper passes through
    back = BoundsNormalizer(STATS, "bounds").unnormalize(BoundsNormalizer(STATS, "bounds").normalize(x))
    assert back == pytest.approx(x.astype(np.float32), abs=1e-6)  # inside [min, max]: nothing clipped
    q99_back = BoundsQ99Normalizer(STATS).unnormalize(BoundsQ99Normalizer(STATS).normalize(x))
    assert q99_back[0, 5] == pytest.approx(0.5) and q99_back[0, 1] == pytest.approx(-0.5)  # clipped to q01/q99


def test_unknown_kind_and_bounds_without_min_max_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown normalization 'minmax'"):
        BoundsNormalizer(STATS, "minmax")
    old = NormStats(q01=STATS.q01, q99=STATS.q99, mask=MASK)  # a statistics file without min / max
    with pytest.raises(ConfigError, match="needs the statistics' min and max"):
        BoundsNormalizer(old, "bounds")
    BoundsNormalizer(old, "bounds_q99")  # still fine


def test_min_max_are_checked_and_round_trip() -> None:
    assert NormStats.from_dict(STATS.to_dict()).to_dict() == STATS.to_dict()
    with pytest.raises(ConfigError, match="min / max but not the other"):
        NormStats(q01=STATS.q01, q99=STATS.q99, mask=MASK, min=STATS.min)
    with pytest.raises(ShapeError, match="`max` has shape"):
        NormStats(q01=STATS.q01, q99=STATS.q99, mask=MASK, min=STATS.min, max=STATS.max[:6])
    with pytest.raises(ConfigError, match="max < min"):
        NormStats(q01=STATS.q01, q99=STATS.q99, mask=MASK, min=STATS.max, max=STATS.min)
    fitted = NormStats.from_data(np.arange(20.0).reshape(10, 2))
    assert fitted.min.tolist() == [0.0, 1.0] and fitted.max.tolist() == [18.0, 19.0]


def _actions(n: int, seed: int, yaw: float = 0.0) -> np.ndarray:
    a = np.random.default_rng(seed).uniform(-0.2, 0.2, (n, 7))
    a[:, 5] = 0.0
    a[:5, 5] = yaw  # a rare large rotation at the start
    a[:, 6] = -1.0
    return a


def test_action_space_file_keeps_the_kind_and_old_files_mean_bounds_q99(tmp_path) -> None:
    actions = np.concatenate([_actions(600, 0), _actions(100, 1, yaw=0.6)])  # 5 of 700 steps turn
    space = ActionSpace.fit(actions, normalization="bounds")
    space.save(tmp_path)
    loaded = ActionSpace.load(tmp_path)
    assert loaded.normalization == "bounds"
    assert loaded.to_env(np.ones((1, 7), np.float32))[0, 5] == pytest.approx(0.6)  # the rare rotation is reachable
    data = json.loads((tmp_path / "action_stats.json").read_text())
    del data["normalization"]  # a file written before the key existed
    (tmp_path / "action_stats.json").write_text(json.dumps(data))
    legacy = ActionSpace.load(tmp_path)
    assert legacy.normalization == "bounds_q99"
    assert legacy.to_env(np.ones((1, 7), np.float32))[0, 5] < 0.6  # q99 lies below it: unreachable
    data["normalization"] = "zscore"
    (tmp_path / "action_stats.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointMismatchError, match="normalization 'zscore'"):
        ActionSpace.load(tmp_path)


def test_clipping_report_names_the_task_whose_rare_motion_q99_cuts_off() -> None:
    demos = [Demo(name=f"demo_{i}", actions=_actions(60, i), instruction="pick up the bowl") for i in range(8)]
    demos.append(Demo(name="demo_8", actions=_actions(40, 8, yaw=0.6), instruction="open the drawer"))
    actions = np.concatenate([d.actions for d in demos])
    q99 = ActionSpace.fit(actions, normalization="bounds_q99")
    report = clipping_by_task(demos, q99)
    assert report["open the drawer"]["steps"] == 40
    assert report["open the drawer"]["clipped_fraction"]["dyaw"] == pytest.approx(5 / 40)
    assert report["open the drawer"]["largest_clipped"]["dyaw"] == pytest.approx(0.6)
    assert report["pick up the bowl"]["clipped_fraction"]["dyaw"] == 0.0
    assert "gripper" not in report["open the drawer"]["clipped_fraction"]
    warnings = clipping_warnings(report, q99)
    assert any("12.5 % of the dyaw actions of 'open the drawer'" in w and "--normalization bounds" in w
               for w in warnings), warnings
    bounds = ActionSpace.fit(actions, normalization="bounds")
    report = clipping_by_task(demos, bounds)
    assert all(f == 0.0 for e in report.values() for f in e["clipped_fraction"].values())
    assert clipping_warnings(report, bounds) == []


@pytest.mark.parametrize("kind", ["rsd", "l1"])
def test_saved_policy_keeps_its_normalization(tmp_path, kind: str) -> None:
    policy = tiny_rsd_policy(speculative=False) if kind == "rsd" else tiny_l1_policy()
    stats = NormStats(q01=[-0.5] * 6 + [0.0], q99=[0.5] * 6 + [1.0], mask=MASK, min=[-1.0] * 6 + [0.0],
                      max=[1.0] * 6 + [1.0])
    cls = RSDPolicy if kind == "rsd" else L1Policy
    args = (policy.backbone, policy.head, policy.tokenizer) if kind == "rsd" else (policy.backbone, policy.head)
    bounded = cls(*args, stats, config=policy.config, action_normalization="bounds")
    q99 = cls(*args, stats, config=policy.config)
    obs = fake_observation(0)
    wide = bounded.predict_chunk(obs, "task").actions
    narrow = q99.predict_chunk(obs, "task").actions
    assert np.abs(wide[:, :6]).max() > 0.5 >= np.abs(narrow[:, :6]).max() - 1e-6  # min/max reach further
    bounded.save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "policy.json").read_text())
    assert meta["action_normalization"] == "bounds"
    loaded = cls.from_pretrained(tmp_path / "p")
    assert loaded.action_normalization == "bounds"
    np.testing.assert_array_equal(loaded.predict_chunk(obs, "task").actions, wide)
    del meta["action_normalization"]  # saved before the key existed: BOUNDS_Q99
    (tmp_path / "p" / "policy.json").write_text(json.dumps(meta))
    assert cls.from_pretrained(tmp_path / "p").action_normalization == "bounds_q99"
    meta["action_normalization"] = "zscore"
    (tmp_path / "p" / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="action_normalization 'zscore'"):
        cls.from_pretrained(tmp_path / "p")

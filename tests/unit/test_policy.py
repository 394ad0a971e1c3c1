"""Policy protocol, the RSD inference path and its loud failures."""

import numpy as np
import pytest
import torch

from policy_factory import ACTION_STATS, fake_observation, tiny_config, tiny_l1_policy, tiny_rsd_policy
from rsd.errors import (ActionGenerationError, CheckpointNotFoundError, ConfigError, DeadHiddenStateError, DTypeError,
                        NonFiniteError, ShapeError)
from rsd.policy import ActionChunk, Policy, RSDPolicy

pytestmark = pytest.mark.unit

INSTR = "pick up the black bowl and place it on the plate"


class BrokenBackbone:
    """A backbone whose forward fails, or returns a chosen hidden state."""

    hidden_dim = 32

    def __init__(self, hidden=None):
        self.hidden = hidden

    def encode(self, observation, instruction, *, check=True):
        if self.hidden is None:
            raise RuntimeError("vision tower exploded")
        return self.hidden


def test_policies_implement_the_protocol():
    for policy in (tiny_rsd_policy(), tiny_l1_policy()):
        assert isinstance(policy, Policy)
        chunk = policy.predict_chunk(fake_observation(), INSTR)
        assert isinstance(chunk, ActionChunk)
        assert chunk.actions.shape == (4, 7) and chunk.actions.dtype == np.float32
        assert set(np.unique(chunk.actions[:, -1])) <= {-1.0, 0.0, 1.0}  # env gripper convention


def test_rsd_info_holds_the_decode_diagnostics():
    policy = tiny_rsd_policy()
    actions, info = policy.generate_action(fake_observation(), INSTR)
    cfg = tiny_config()
    assert actions.shape == (cfg.chunk_len, cfg.action_dim)
    assert info["used_rfsq"] is True and info["hidden_shape"] == [1, 32] and info["hidden_norm"] > 0
    assert len(info["code_histogram"]) == cfg.num_layers
    assert all(sum(row) == cfg.chunk_len * cfg.latent_dim for row in info["code_histogram"])
    assert info["action_min"] <= info["action_max"]
    assert set(info["timing_ms"]) >= {"backbone_ms", "tokens_ms", "detokenize_ms", "total_ms"}
    assert "spec_stats" in info


def test_speculative_exact_equals_greedy_policy():
    obs = fake_observation(3)
    spec = tiny_rsd_policy(speculative=True, seed=5)
    greedy = RSDPolicy(spec.backbone, spec.head, spec.tokenizer, ACTION_STATS, config=spec.config, draft=spec.draft,
                       speculative=False)
    np.testing.assert_array_equal(spec.predict_chunk(obs, INSTR).actions, greedy.predict_chunk(obs, INSTR).actions)


def test_rows_are_not_tiled():
    """Tiling one action 8 times is a known failure (docs/failure-modes.md); a decoded chunk from varied codes has distinct rows."""
    chunk = tiny_rsd_policy(seed=1).predict_chunk(fake_observation(1), INSTR)
    assert len({tuple(row) for row in chunk.actions[:, :6].round(6)}) > 1


def test_backbone_exception_surfaces_and_returns_nothing():
    policy = tiny_rsd_policy()
    policy.backbone = BrokenBackbone()
    with pytest.raises(ActionGenerationError, match="vision tower exploded") as err:
        policy.predict_chunk(fake_observation(), INSTR)
    assert isinstance(err.value.__cause__, RuntimeError)


@pytest.mark.parametrize("hidden, cause", [
    (torch.zeros(1, 32), DeadHiddenStateError),
    (torch.full((1, 32), float("nan")), DeadHiddenStateError),
    (torch.ones(1, 16), ShapeError),
    (torch.ones(2, 32), ShapeError),
])
def test_bad_hidden_states_raise(hidden, cause):
    policy = tiny_l1_policy()
    policy.backbone = BrokenBackbone(hidden)
    with pytest.raises(ActionGenerationError) as err:
        policy.predict_chunk(fake_observation(), INSTR)
    assert isinstance(err.value.__cause__, cause)


def test_non_finite_decoded_chunk_raises():
    policy = tiny_l1_policy()
    with torch.no_grad():
        for p in policy.head.parameters():
            p.fill_(float("inf"))
    with pytest.raises(ActionGenerationError) as err:
        policy.predict_chunk(fake_observation(), INSTR)
    assert isinstance(err.value.__cause__, NonFiniteError)


def test_action_chunk_validates():
    with pytest.raises(ShapeError):
        ActionChunk(np.zeros(7, np.float32))
    with pytest.raises(DTypeError):
        ActionChunk(np.zeros((8, 7), np.float64))
    with pytest.raises(NonFiniteError):
        ActionChunk(np.full((8, 7), np.nan, np.float32))


def test_missing_head_checkpoint_raises(tmp_path):
    policy = tiny_rsd_policy()
    policy.save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "head.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="RFSQ head") as err:
        RSDPolicy.from_pretrained(tmp_path / "p")
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFoundError):
        RSDPolicy.from_pretrained(tmp_path / "nowhere")


def test_config_mismatches_raise():
    policy = tiny_rsd_policy()
    with pytest.raises(ConfigError, match="hidden_dim"):
        RSDPolicy(BrokenBackbone.__new__(type("B", (), {"hidden_dim": 99})), policy.head, policy.tokenizer,
                  ACTION_STATS, config=policy.config)
    with pytest.raises(ConfigError, match="draft"):
        RSDPolicy(policy.backbone, policy.head, policy.tokenizer, ACTION_STATS, config=policy.config,
                  speculative=True)


def test_the_hidden_state_is_checked_once_per_chunk(monkeypatch) -> None:
    """The policy asks the backbone not to check (check=False) and runs check_hidden itself, once."""
    import rsd.policy.learned as learned

    calls = []
    real = learned.check_hidden
    monkeypatch.setattr(learned, "check_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    for policy in (tiny_rsd_policy(), tiny_l1_policy()):
        seen = []
        encode = policy.backbone.encode
        monkeypatch.setattr(policy.backbone, "encode", lambda o, i, *, check=True: seen.append(check) or encode(o, i, check=check))
        calls.clear()
        policy.predict_chunk(fake_observation(), INSTR)
        assert calls == [1] and seen == [False]

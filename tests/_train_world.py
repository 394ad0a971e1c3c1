"""Synthetic demonstrations for the ``rsd train-policy`` tests (no LIBERO), in the layout ``rsd collect`` records, and
the checks the low-dimensional and pixel training tests share (losses fall, a resumed run equals an uninterrupted one).

A demo reaches for a random target: smooth actions towards it, the gripper closing halfway. The low-dim tests pose
named objects (the first one at the target); the pixel tests render raw camera frames in which a bright square marks
the target (upside down, as LIBERO renders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch

from rsd.action_space import ActionSpace
from rsd.config import RSDConfig
from rsd.tokenizer import RFSQTokenizer

TINY = RSDConfig.tiny()


def _frames(target: np.ndarray, T: int, size: int, shade: int) -> np.ndarray:
    """uint8 [T, size, size, 3]: dark background, a bright square where the target is, rotated 180 degrees."""
    frames = np.full((T, size, size, 3), 30, np.uint8)
    side = size // 4
    r, c = (np.clip((target[:2] + 0.2) / 0.4, 0, 1) * (size - side)).astype(int)
    frames[:, r:r + side, c:c + side] = (shade, 200, 255 - shade)
    return np.ascontiguousarray(frames[:, ::-1, ::-1])


def reaching_demo(rng: np.random.Generator, names: Sequence[str] = (), T: int = 24, camera: int | None = None) -> dict:
    """``DemoWriter.add`` kwargs of one demo: proprio parts, ``names`` objects' poses (the first at the target) and,
    with ``camera``, raw ``agentview_rgb`` / ``eye_in_hand_rgb`` frames of that side."""
    target = rng.uniform(-0.2, 0.2, 3)
    ee = np.zeros((T, 3))
    actions = np.zeros((T, 7))
    for t in range(T):
        step = np.clip((target - ee[t]) * 5.0, -1, 1)
        actions[t, :3] = step
        actions[t, 6] = 1.0 if t > T // 2 else -1.0
        if t + 1 < T:
            ee[t + 1] = ee[t] + 0.05 * step
    obs = {"ee_pos": ee, "ee_ori": np.zeros((T, 3)), "gripper_states": np.tile([0.04, -0.04], (T, 1)),
           "ee_states": np.zeros((T, 6)), "joint_states": np.zeros((T, 7))}
    for i, name in enumerate(names):
        pos = np.tile(target if i == 0 else rng.uniform(-0.3, 0.3, 3), (T, 1))
        obs[f"{name}_pos"], obs[f"{name}_quat"] = pos, np.tile([0.0, 0.0, 0.0, 1.0], (T, 1))
    if camera is not None:
        obs["agentview_rgb"], obs["eye_in_hand_rgb"] = _frames(target, T, camera, 250), _frames(target, T, camera, 100)
    return {"actions": actions, "obs": obs, "states": np.zeros((T, 4)), "robot_states": np.zeros((T, 9))}


def tiny_tokenizer(directory: Path, actions: Sequence[np.ndarray]) -> Path:
    """A random tiny RFSQ tokenizer (seed 0) with the action space of ``actions``, saved in ``directory``."""
    torch.manual_seed(0)
    RFSQTokenizer.from_config(TINY).save_pretrained(directory)
    ActionSpace.fit(np.concatenate(actions)).save(directory)
    return directory


def train_on(world: dict, out: Path, config: Any, demos: str = "demos", **kw: Any) -> dict:
    """``train_policy`` on ``world[demos]`` with ``world["tokenizer"]``, a quarter of the episodes held out, quietly."""
    from rsd.train.policy_cli import train_policy

    return train_policy([world[demos]], out, config, tokenizer_dir=world["tokenizer"], val_fraction=0.25,
                        progress=False, **kw)


def assert_losses_fall(curve: Sequence[dict[str, Any]]) -> None:
    first, last = curve[0]["train"], curve[-1]["train"]
    for key in ("ce_main", "ce_draft", "l1"):
        assert last[key] < first[key], (key, first[key], last[key])


def assert_resume_equals_uninterrupted(trainer: Callable[[str], Any], killed_at_checkpoint: int) -> Any:
    """``trainer(out)`` builds a Trainer into ``out``: one runs straight through; another is killed at its first
    evaluation, resumed from its last checkpoint (``killed_at_checkpoint``) and finished: their weights must be
    equal bit for bit. Returns the straight trainer."""
    straight = trainer("straight")
    straight.train(progress=False)

    def crash(entry: dict) -> None:
        raise KeyboardInterrupt  # killed at an evaluation (which comes before that step's checkpoint)

    with pytest.raises(KeyboardInterrupt):
        trainer("killed").train(progress=False, on_eval=crash)
    resumed = trainer("killed")
    resumed.load_checkpoint()
    assert resumed.step == killed_at_checkpoint
    resumed.train(progress=False)
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    return straight

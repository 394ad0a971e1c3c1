"""Recorded demonstrations -> the training arrays of a low-dimensional policy.

Each step ``t`` of a demo is one sample: the observation *before* action ``t`` (proprio, every object's pose, the
instruction) and the chunk of the next ``C`` actions ``actions[t : t + C]``. Near the end of an episode the chunk
runs past the last action; it is padded by repeating the last action (the arm holds its final command), so every
recorded state is trained on. Chunks are normalized with the tokenizer's action space and tokenized once, here.

``motion`` is what ``LowDimBackbone(motion=True)`` reads at evaluation time: the state now minus the state at the
previous chunk's first step, ``C`` steps earlier (:func:`chunk_motion`; the first chunk of an episode sees zero
motion at evaluation, and steps ``t < C`` here see their motion since the first step). It comes from the executed
motion, so DART demos (noisy execution, clean labels) teach it honestly.

Objects differ between tasks (K varies): arrays are padded to the largest K with ``object_mask`` False, and the
words of each task's object names and instruction are stored once per task (``task_index`` points at them).
Proprio is OpenVLA-OFT's 8-d vector, rebuilt from the demo's ``ee_pos``, ``ee_ori`` (axis-angle) and
``gripper_states``: the very values ``rsd.sim.protocol.proprio_from_obs`` computes at evaluation time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from rsd.backbones.lowdim import LowDimInputs, object_features, pad_ids, word_ids
from rsd.errors import ConfigError, ShapeError

__all__ = ["PolicyData", "build_policy_data", "chunk_targets", "chunk_motion", "demo_proprio", "tokenize_chunks"]

_PROPRIO_PARTS = ("ee_pos", "ee_ori", "gripper_states")


def chunk_targets(actions: np.ndarray, chunk_len: int) -> np.ndarray:
    """``actions`` [T, A] -> [T, C, A]: row t holds ``actions[t : t + C]``, padded with the last action."""
    T = actions.shape[0]
    index = np.minimum(np.arange(T)[:, None] + np.arange(chunk_len)[None, :], T - 1)  # [T, C]
    return actions[index]


def chunk_motion(state: np.ndarray, chunk_len: int) -> np.ndarray:
    """``state`` [T, P] -> [T, P]: row t holds ``state[t] - state[max(t - C, 0)]`` (what the policy saw move since the
    previous chunk began)."""
    previous = np.maximum(np.arange(state.shape[0]) - chunk_len, 0)
    return state - state[previous]


@dataclass
class PolicyData:
    """Training arrays (numpy, one row per sample) and the per-task word tables."""

    state: np.ndarray  # float32 [N, P]
    objects: np.ndarray  # float32 [N, K, 10] (object_features)
    object_mask: np.ndarray  # bool [N, K]
    task_index: np.ndarray  # int64 [N]
    episode: np.ndarray  # int64 [N]: the demo each sample comes from
    actions: np.ndarray  # float32 [N, C, A] normalized chunk
    codes: np.ndarray  # uint8 [N, L, C, H] the chunk's tokens (head layout)
    name_ids: np.ndarray  # int64 [tasks, K, Nn]
    instruction_ids: np.ndarray  # int64 [tasks, I]
    instructions: list[str]
    num_episodes: int
    motion: np.ndarray  # float32 [N, P]: chunk_motion of the state

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def fit_backbone(self, backbone: Any, rows: np.ndarray) -> None:
        """Fit ``backbone``'s input standardization (``LowDimBackbone.fit_input_stats``) on the training ``rows``."""
        backbone.fit_input_stats(self.state[rows], self.objects[rows], self.object_mask[rows],
                                 self.motion[rows] if backbone.motion else None)

    def batch(self, rows: np.ndarray | torch.Tensor, augment: np.random.Generator | None = None
              ) -> tuple[LowDimInputs, torch.Tensor, torch.Tensor]:
        """Rows -> (inputs, normalized chunk float32 [B, C, A], codes int64 [B, L, C, H]). ``augment`` (the trainer's
        per-step generator) is accepted for the pixel data's sake: low-dim inputs are never augmented."""
        rows = np.asarray(rows)
        tasks = self.task_index[rows]
        inputs = LowDimInputs(torch.from_numpy(self.state[rows]), torch.from_numpy(self.objects[rows]),
                              torch.from_numpy(self.object_mask[rows]), torch.from_numpy(self.name_ids[tasks]),
                              torch.from_numpy(self.instruction_ids[tasks]), motion=torch.from_numpy(self.motion[rows]))
        return inputs, torch.from_numpy(self.actions[rows]), torch.from_numpy(self.codes[rows].astype(np.int64))

    def rows_of(self, episodes: Sequence[int]) -> np.ndarray:
        """Sample rows of the given episodes (int64, ascending)."""
        return np.flatnonzero(np.isin(self.episode, np.asarray(list(episodes), dtype=np.int64)))


def demo_proprio(demo: Any) -> np.ndarray:
    missing = [k for k in _PROPRIO_PARTS if k not in demo.obs]
    if missing:
        raise ShapeError(f"demo {demo.name!r} lacks obs {missing}: the proprio vector needs {_PROPRIO_PARTS}; record "
                         f"demos with `rsd collect`.")
    return np.concatenate([np.asarray(demo.obs[k], dtype=np.float64) for k in _PROPRIO_PARTS], axis=1)


def _object_names(demo: Any) -> list[str]:
    if "rsd_objects" not in demo.attrs:
        raise ShapeError(f"demo {demo.name!r} has no `rsd_objects` attribute (the posed objects): low-dimensional "
                         f"policies train on demos recorded by `rsd collect`.")
    names = json.loads(demo.attrs["rsd_objects"])
    missing = [n for n in names if f"{n}_pos" not in demo.obs or f"{n}_quat" not in demo.obs]
    if missing:
        raise ShapeError(f"demo {demo.name!r} lists objects {missing} without their pose datasets.")
    return list(names)


def build_policy_data(demos: Sequence[Any], tokenizer: Any, space: Any, *, word_buckets: int,
                      progress: bool = False) -> PolicyData:
    """Demos (``rsd.sim.demos.Demo`` with obs) -> :class:`PolicyData`, tokenized with ``tokenizer`` in ``space``."""
    from tqdm import tqdm

    if not demos:
        raise ConfigError("no demos to build training data from.")
    chunk_len = int(tokenizer.config["chunk_len"])
    tasks: dict[tuple[str, tuple[str, ...]], int] = {}  # (instruction, object names) -> task index
    states, motions, features, task_index, episode, env_chunks = [], [], [], [], [], []
    for e, demo in enumerate(tqdm(demos, desc="demos", disable=not progress, unit="demo")):
        names = _object_names(demo)
        task = tasks.setdefault((demo.instruction, tuple(names)), len(tasks))
        state = demo_proprio(demo).astype(np.float32)  # [T, P]
        poses = np.stack([np.concatenate([demo.obs[f"{n}_pos"], demo.obs[f"{n}_quat"]], axis=1) for n in names],
                         axis=1).astype(np.float32)  # [T, K, 7]
        states.append(state)
        motions.append(chunk_motion(state, chunk_len))
        features.append(object_features(poses, state).numpy())  # [T, K, 10]
        task_index.append(np.full(len(state), task, np.int64))
        episode.append(np.full(len(state), e, np.int64))
        env_chunks.append(chunk_targets(np.asarray(demo.actions, dtype=np.float64), chunk_len))  # [T, C, A]
    k_max = max(f.shape[1] for f in features)
    lengths = [len(f) for f in features]
    objects = np.zeros((sum(lengths), k_max, features[0].shape[2]), dtype=np.float32)
    mask = np.zeros((sum(lengths), k_max), dtype=bool)
    for start, f in zip(np.cumsum([0] + lengths[:-1]), features):  # pad each demo's objects to K_max
        objects[start:start + len(f), : f.shape[1]], mask[start:start + len(f), : f.shape[1]] = f, True
    normalized = space.normalize(np.concatenate(env_chunks)).astype(np.float32)  # [N, C, A]
    per_task = [pad_ids([word_ids(n, word_buckets) for n in names]) for _, names in tasks]  # [K_t, Nn_t] each
    name_ids = np.zeros((len(tasks), k_max, max(ids.shape[1] for ids in per_task)), dtype=np.int64)
    for t, ids in enumerate(per_task):
        name_ids[t, : ids.shape[0], : ids.shape[1]] = ids
    return PolicyData(
        state=np.concatenate(states), objects=objects, object_mask=mask, task_index=np.concatenate(task_index),
        episode=np.concatenate(episode), actions=normalized, codes=tokenize_chunks(tokenizer, normalized),
        name_ids=name_ids,
        instruction_ids=pad_ids([word_ids(k[0], word_buckets) for k in tasks]),
        instructions=[k[0] for k in tasks], num_episodes=len(demos), motion=np.concatenate(motions))


def tokenize_chunks(tokenizer: Any, normalized: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Normalized chunks [N, C, A] -> codes uint8 [N, L, C, H] (the heads' layout, ``rsd.layout``)."""
    from rsd.layout import codes_to_layers

    out = []
    with torch.inference_mode():
        for i in range(0, normalized.shape[0], batch):
            codes = tokenizer.encode(torch.from_numpy(normalized[i:i + batch]))  # [b, C, H, L]
            out.append(codes_to_layers(codes).to(torch.uint8).numpy())
    return np.concatenate(out)

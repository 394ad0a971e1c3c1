"""`LowDimBackbone`: privileged low-dimensional observation + instruction -> hidden [B, D].

It reads what a simulator knows and a camera does not: the proprio vector and every task object's pose
(``rsd.observation``: ``state``, ``object_poses``, ``object_names``), plus the instruction. One token each
(width W), a small pre-norm Transformer over them, and a projection to D::

    instruction   words + bigrams -> stable hash -> Embedding (mean)                          -> [B, 1, W]
    proprio       standardized [state [B, P], motion [B, P] when ``motion``] -> MLP             -> [B, 1, W]
    object k      standardized [pos 3, quat 4 (w >= 0), pos - eef_pos 3] -> Linear
                  + its name's words ("akita black bowl 1") through the instruction's Embedding -> [B, K, W]
    Transformer (layers x heads, key padding mask for absent objects)                         -> [B, 2 + K, W]
    concat(instruction token, proprio token, mean over present objects) -> LayerNorm -> Linear -> hidden [B, D]

``motion`` (optional): how the proprio changed since the previous chunk began, ``state - previous_state`` (zero
at an episode's first chunk). A single observation cannot tell an arm that is still moving towards its goal from
one that is stuck against a drawer's wall; the scripted expert that made the demonstrations tells them apart by its
own history (it closes the gripper when the arm stalls), so a policy without that history cannot imitate it there.
The backbone keeps the previous chunk's state between :meth:`LowDimBackbone.encode` calls; :meth:`reset` (called by
the policy's ``reset`` at every episode start) forgets it. A batch of several episodes' observations
(:meth:`LowDimBackbone.encode_slots`, what a policy's ``predict_chunks`` calls) keeps one previous state per slot
(episode), which :meth:`LowDimBackbone.reset_slot` forgets. Training computes the same feature from the demos
(``rsd.train.policy_data``: the state ``C`` steps earlier, C the chunk length).

Names and instruction share one word table, so "bowl" in "pick up the black bowl" and in the name
``akita_black_bowl_1`` is one vector: the model can learn which object an instruction means. Objects may differ
from task to task (K varies): a batch is padded to its largest K and masked. The input statistics (mean/std of
the proprio and object features) are buffers fitted on training data (:meth:`fit_input_stats`) and saved with the
weights. Tokenized inputs come from :func:`lowdim_inputs` (one observation dict) or from the trainer's arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from einops import rearrange
from torch import nn

from rsd.backbones.base import (WEIGHTS_FILE, StateDictWeights, check_hidden, instructions_for_batch,
                                register_backbone)
from rsd.backbones.tiny import instruction_buckets_of
from rsd.errors import ConfigError, ShapeError
from rsd.observation import OBJECT_NAMES, OBJECT_POSES, POSE_DIM, STATE, ObservationSpec

__all__ = ["LowDimBackbone", "LowDimInputs", "lowdim_inputs", "object_features", "word_ids", "pad_ids",
           "mean_embedding", "WEIGHTS_FILE", "OBJECT_FEATURE_DIM"]

OBJECT_FEATURE_DIM = POSE_DIM + 3  # pos 3 + quat 4 + (pos - eef_pos) 3
_EEF_POS = slice(0, 3)  # eef position inside the proprio vector (rsd.observation)


def word_ids(text: str, num_buckets: int) -> list[int]:
    """Embedding rows of ``text``'s lowercase words and bigrams, in ``[1, num_buckets]`` (0 is padding).
    Object names are read as words: ``akita_black_bowl_1`` -> "akita black bowl 1"."""
    return [b + 1 for b in instruction_buckets_of(text.replace("_", " "), num_buckets)]


def pad_ids(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Ragged id lists -> int64 ``[N, max len]`` padded with 0."""
    out = np.zeros((len(rows), max((len(r) for r in rows), default=1) or 1), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def object_features(poses: np.ndarray | torch.Tensor, state: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``poses`` [B, K, 7] + ``state`` [B, P] -> float32 [B, K, 10]: position, quaternion with ``w >= 0`` (q and -q
    are one rotation), position relative to the end effector."""
    poses = torch.as_tensor(poses, dtype=torch.float32)
    state = torch.as_tensor(state, dtype=torch.float32)
    pos, quat = poses[..., :3], poses[..., 3:POSE_DIM]
    quat = torch.where(quat[..., 3:4] < 0, -quat, quat)
    rel = pos - rearrange(state[..., _EEF_POS], "b d -> b 1 d")
    return torch.cat([pos, quat, rel], dim=-1)


class LowDimInputs:
    """A batch of tokenized low-dim inputs (all tensors, batch first): ``state`` [B, P], ``objects`` [B, K, 10]
    (:func:`object_features`), ``object_mask`` bool [B, K] (True = present), ``name_ids`` int64 [B, K, N],
    ``instruction_ids`` int64 [B, I] (0 = padding), ``motion`` [B, P] or None (``state - previous_state``)."""

    def __init__(self, state: torch.Tensor, objects: torch.Tensor, object_mask: torch.Tensor, name_ids: torch.Tensor,
                 instruction_ids: torch.Tensor, motion: torch.Tensor | None = None) -> None:
        B = state.shape[0]
        if not (objects.shape[:2] == object_mask.shape == name_ids.shape[:2] and objects.shape[0] == B
                and instruction_ids.shape[0] == B and (motion is None or motion.shape == state.shape)):
            raise ShapeError(f"low-dim inputs disagree: state {list(state.shape)}, objects {list(objects.shape)}, "
                             f"mask {list(object_mask.shape)}, names {list(name_ids.shape)}, "
                             f"instruction {list(instruction_ids.shape)}, "
                             f"motion {None if motion is None else list(motion.shape)}.")
        self.state, self.objects, self.object_mask = state, objects, object_mask
        self.name_ids, self.instruction_ids, self.motion = name_ids, instruction_ids, motion

    def to(self, device: torch.device | str) -> "LowDimInputs":
        return LowDimInputs(*(t.to(device) for t in (self.state, self.objects, self.object_mask, self.name_ids,
                                                      self.instruction_ids)),
                            motion=None if self.motion is None else self.motion.to(device))


def lowdim_inputs(observation: dict, instruction: str | list[str], spec: ObservationSpec,
                  num_buckets: int, previous_state: torch.Tensor | None = None, *,
                  motion: bool = False) -> LowDimInputs:
    """One observation dict (unbatched or batched; one task) + instruction(s) -> :class:`LowDimInputs`.
    With ``motion``, ``motion = state - previous_state`` (zeros when ``previous_state`` is None: a first chunk)."""
    spec.validate(observation)
    state = torch.as_tensor(observation[STATE], dtype=torch.float32)  # numpy or torch, [P] or [B, P]
    poses = torch.as_tensor(observation[OBJECT_POSES], dtype=torch.float32)
    if state.ndim == 1:
        state, poses = state[None], poses[None]
    B, K = poses.shape[:2]
    names = pad_ids([word_ids(n, num_buckets) for n in observation[OBJECT_NAMES]])  # [K, N]
    texts = instructions_for_batch(instruction, B)
    instr = pad_ids([word_ids(t, num_buckets) for t in texts])  # [B, I]
    moved = None
    if motion:
        if previous_state is not None and previous_state.shape != state.shape:
            raise ShapeError(f"the previous chunk's state has shape {list(previous_state.shape)}, this one "
                             f"{list(state.shape)}: call the policy's reset() at every episode start.")
        moved = torch.zeros_like(state) if previous_state is None else state - previous_state
    return LowDimInputs(state, object_features(poses, state), torch.ones(B, K, dtype=torch.bool),
                        torch.from_numpy(names)[None].expand(B, -1, -1), torch.from_numpy(instr), motion=moved)


def mean_embedding(table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """Mean of the non-padding rows: ids [..., N] -> [..., W] (an all-padding row gives zeros)."""
    emb = table(ids)  # [..., N, W]
    present = (ids > 0).unsqueeze(-1).float()
    return (emb * present).sum(-2) / present.sum(-2).clamp(min=1.0)


@register_backbone("lowdim")
class LowDimBackbone(StateDictWeights, nn.Module):
    """Proprio + object poses + instruction -> hidden float32 [B, D] (module docstring).

    Args:
        hidden_dim: D. width: W, token width. layers / heads: the Transformer's depth and attention heads.
        word_buckets: hash buckets of the word table (instruction and object names).
        proprio_dim: P (8 on LIBERO). seed: weights initialised under ``torch.manual_seed(seed)`` in a forked RNG.
        motion: also read ``state - previous_state`` (module docstring); such a backbone remembers the previous
            :meth:`encode`'s state until :meth:`reset`.
    """

    backbone_name: str  # set by @register_backbone
    reads_images = False  # rsd eval renders nothing for it unless a video is asked for

    def __init__(self, hidden_dim: int = 256, width: int = 128, layers: int = 2, heads: int = 4,
                 word_buckets: int = 2048, proprio_dim: int = 8, seed: int | None = 0, motion: bool = False) -> None:
        super().__init__()
        for name, value, low in (("hidden_dim", hidden_dim, 1), ("width", width, 8), ("layers", layers, 1),
                                 ("heads", heads, 1), ("word_buckets", word_buckets, 1),
                                 ("proprio_dim", proprio_dim, 3)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"LowDimBackbone `{name}` must be an int >= {low}, got {value!r}.")
        if not isinstance(motion, bool):
            raise ConfigError(f"LowDimBackbone `motion` must be a bool, got {motion!r}.")
        if width % heads:
            raise ConfigError(f"LowDimBackbone `width` ({width}) must be a multiple of `heads` ({heads}).")
        self.hidden_dim, self.width, self.layers, self.heads = hidden_dim, width, layers, heads
        self.word_buckets, self.proprio_dim, self.seed, self.motion = word_buckets, proprio_dim, seed, motion
        self._previous_state: torch.Tensor | None = None  # the last encode's state (motion only)
        self._slot_states: dict[int, torch.Tensor] = {}  # encode_slots: each slot's last state [P] (motion only)
        self.observation_spec = ObservationSpec(images=(), proprio_dim=proprio_dim, objects=True)
        # input standardization, fitted on training data (fit_input_stats) and saved with the weights
        self.register_buffer("state_mean", torch.zeros(proprio_dim))
        self.register_buffer("state_std", torch.ones(proprio_dim))
        self.register_buffer("object_mean", torch.zeros(OBJECT_FEATURE_DIM))
        self.register_buffer("object_std", torch.ones(OBJECT_FEATURE_DIM))
        if motion:
            self.register_buffer("motion_mean", torch.zeros(proprio_dim))
            self.register_buffer("motion_std", torch.ones(proprio_dim))
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.words = nn.Embedding(word_buckets + 1, width, padding_idx=0)
            self.proprio = nn.Sequential(nn.Linear(proprio_dim * (2 if motion else 1), width), nn.GELU(),
                                         nn.Linear(width, width))
            self.object_proj = nn.Linear(OBJECT_FEATURE_DIM, width)
            self.kind = nn.Parameter(torch.zeros(3, width))  # token type: instruction, proprio, object
            nn.init.normal_(self.kind, std=0.02)
            layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.out = nn.Sequential(nn.LayerNorm(3 * width), nn.Linear(3 * width, hidden_dim))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def reset(self) -> None:
        """Forget the previous chunk's state (a new episode begins)."""
        self._previous_state = None

    def fit_input_stats(self, state: np.ndarray, objects: np.ndarray, object_mask: np.ndarray,
                        motion: np.ndarray | None = None) -> None:
        """Set the standardization buffers from training arrays: ``state`` [N, P], ``objects`` [N, K, 10],
        ``object_mask`` [N, K] (only present objects count), ``motion`` [N, P] (exactly when the backbone reads
        it). A constant feature keeps std 1."""
        if (motion is None) == self.motion:
            raise ConfigError(f"fit_input_stats got {'no' if motion is None else 'a'} motion array for a backbone "
                              f"with motion={self.motion}.")
        present = objects[object_mask.astype(bool)]  # [M, 10]
        pairs = [(self.state_mean, self.state_std, state), (self.object_mean, self.object_std, present)]
        if motion is not None:
            pairs.append((self.motion_mean, self.motion_std, motion))
        for mean_buf, std_buf, x in pairs:
            mean, std = np.mean(x, axis=0), np.std(x, axis=0)
            mean_buf.copy_(torch.as_tensor(mean, dtype=torch.float32))
            std_buf.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))

    def forward_inputs(self, x: LowDimInputs) -> torch.Tensor:
        """Tokenized inputs -> hidden float32 [B, D] (unchecked)."""
        device = self.device
        x = x.to(device)
        instr = mean_embedding(self.words, x.instruction_ids) + self.kind[0]  # [B, W]
        proprio = (x.state - self.state_mean) / self.state_std  # [B, P]
        if self.motion:
            if x.motion is None:
                raise ShapeError("this LowDimBackbone reads motion (state - previous_state) but the inputs have none.")
            proprio = torch.cat([proprio, (x.motion - self.motion_mean) / self.motion_std], dim=-1)  # [B, 2P]
        prop = self.proprio(proprio) + self.kind[1]  # [B, W]
        objs = (self.object_proj((x.objects - self.object_mean) / self.object_std)
                + mean_embedding(self.words, x.name_ids) + self.kind[2])  # [B, K, W]
        tokens = torch.cat([rearrange(instr, "b w -> b 1 w"), rearrange(prop, "b w -> b 1 w"), objs], dim=1)
        always = torch.ones(x.state.shape[0], 2, dtype=torch.bool, device=device)
        present = torch.cat([always, x.object_mask], dim=1)  # [B, 2 + K]
        out = self.encoder(tokens, src_key_padding_mask=~present)  # [B, 2 + K, W]
        weights = x.object_mask.unsqueeze(-1).float()
        pooled = (out[:, 2:] * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean over present objects
        return self.out(torch.cat([out[:, 0], out[:, 1], pooled], dim=-1)).float()

    def encode(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        """observation (``state``, ``object_poses``, ``object_names``; unbatched or batched) + instruction(s) ->
        hidden float32 [B, D]. ShapeError / DTypeError / NonFiniteError naming the key; with ``check``,
        DeadHiddenStateError through ``check_hidden``."""
        inputs = lowdim_inputs(observation, instruction, self.observation_spec, self.word_buckets,
                               self._previous_state, motion=self.motion)
        if self.motion:
            self._previous_state = inputs.state.clone()
        hidden = self.forward_inputs(inputs)
        return check_hidden(hidden, self.hidden_dim) if check else hidden

    def encode_slots(self, observation: dict, instruction: str | list[str], slots: Sequence[int], *,
                     check: bool = True) -> torch.Tensor:
        """:meth:`encode` of a batch whose row ``i`` continues the episode of ``slots[i]`` (one row per slot): with
        ``motion``, each row's motion is from its slot's previous state (zero at the slot's first chunk, and after
        :meth:`reset_slot`), kept apart from :meth:`encode`'s own history. Row ``i`` gets the hidden state that
        ``encode`` of that episode alone gives, up to float summation order."""
        inputs = lowdim_inputs(observation, instruction, self.observation_spec, self.word_buckets, motion=False)
        slots = list(slots)
        if len(slots) != inputs.state.shape[0] or len(set(slots)) != len(slots):
            raise ShapeError(f"encode_slots got slots {slots} for a batch of {inputs.state.shape[0]} observations: "
                             f"pass one distinct slot (episode) per row.")
        if self.motion:
            known = [self._slot_states.get(slot) for slot in slots]
            previous = torch.stack([row if p is None else p for row, p in zip(inputs.state, known)])  # [B, P]
            inputs = LowDimInputs(inputs.state, inputs.objects, inputs.object_mask, inputs.name_ids,
                                  inputs.instruction_ids, motion=inputs.state - previous)  # a first chunk: zeros
            self._slot_states.update((slot, row.clone()) for slot, row in zip(slots, inputs.state))
        hidden = self.forward_inputs(inputs)
        return check_hidden(hidden, self.hidden_dim) if check else hidden

    def reset_slot(self, slot: int) -> None:
        """Forget ``slot``'s previous state (a new episode begins in that slot of :meth:`encode_slots`)."""
        self._slot_states.pop(slot, None)

    def forward(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        return self.encode(observation, instruction, check=check)

    # save / load (see rsd.backbones.base)

    def spec_kwargs(self) -> dict[str, Any]:
        return dict(hidden_dim=self.hidden_dim, width=self.width, layers=self.layers, heads=self.heads,
                    word_buckets=self.word_buckets, proprio_dim=self.proprio_dim, seed=self.seed, motion=self.motion)

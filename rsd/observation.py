"""The observation contract between the simulator and every policy, as data.

An observation is a plain dict (what crosses process boundaries and what LIBERO users expect):

    full_image   uint8 [S, S, 3]  agentview camera, OFT's model input before the crop (rsd.sim.protocol.preprocess_image)
    wrist_image  uint8 [S, S, 3]  wrist camera, same preprocessing
    state        float32 [P]      proprio: eef_pos 3 + axis-angle(eef_quat) 3 + gripper_qpos 2 (P = 8)
    object_poses float32 [K, 7]   privileged: each task object's pose, position 3 + quaternion 4 (x, y, z, w),
                                  world frame, in ``object_names`` order (low-dimensional policies read it)
    object_names tuple of K str   the objects' simulator names (``akita_black_bowl_1``), sorted
    raw          dict             the simulator's own observation (scripted experts only; learned ones never read it)

Batched observations carry a leading ``B`` on every array (``object_names`` stays one tuple: a batch shares a task). Unrendered episodes have no image keys. The arrays
are numpy arrays (what the simulator produces) or torch tensors (what a caller holding tensors may hand a backbone).
``ObservationSpec`` says which keys a consumer needs; ``validate`` checks an observation against it (the backbones
check their input with it) and ``fake`` makes valid ones for tests and benchmarks (one generator, so every test
speaks the same contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from rsd.errors import ConfigError, DTypeError, NonFiniteError, ShapeError

__all__ = ["FULL_IMAGE", "WRIST_IMAGE", "STATE", "RAW", "OBJECT_POSES", "OBJECT_NAMES", "IMAGE_KEYS", "POSE_DIM",
           "ObservationSpec"]

FULL_IMAGE = "full_image"
WRIST_IMAGE = "wrist_image"
STATE = "state"
RAW = "raw"
OBJECT_POSES = "object_poses"
OBJECT_NAMES = "object_names"
POSE_DIM = 7  # position 3 + quaternion 4 (x, y, z, w)
IMAGE_KEYS = (FULL_IMAGE, WRIST_IMAGE)  # OpenVLA-OFT's order on LIBERO: third-person camera first, then wrist
PROPRIO_DIM = 8


@dataclass(frozen=True)
class ObservationSpec:
    """What an observation must hold. ``images``: the image keys required (``()`` for unrendered runs);
    ``image_size``: their side S; ``proprio_dim``: P; ``raw``: whether the simulator's raw dict is required;
    ``objects``: whether the privileged object poses (``object_poses`` + ``object_names``) are required."""

    images: tuple[str, ...] = IMAGE_KEYS
    image_size: int = 224
    proprio_dim: int = PROPRIO_DIM
    raw: bool = False
    objects: bool = False

    def __post_init__(self) -> None:
        unknown = [k for k in self.images if k not in IMAGE_KEYS]
        if unknown:
            raise ConfigError(f"ObservationSpec images {unknown} are not observation keys; known: {IMAGE_KEYS}.")
        if self.image_size <= 0 or self.proprio_dim <= 0:
            raise ConfigError(f"ObservationSpec sizes must be positive, got image_size={self.image_size}, "
                              f"proprio_dim={self.proprio_dim}.")

    def validate(self, observation: Any, *, hint: str = "") -> Mapping[str, Any]:
        """``observation`` itself if it meets the spec (unbatched or with one leading batch size on every
        array); ShapeError / DTypeError / NonFiniteError naming the key and the expected form otherwise.
        ``hint``: what else the caller can do when an image is missing (added to that message)."""
        if not isinstance(observation, Mapping):
            raise DTypeError(f"an observation is a dict with keys {(*self.images, STATE)}, got {type(observation).__name__}.")
        missing = [k for k in (*self.images, STATE) if k not in observation]
        if self.raw and RAW not in observation:
            missing.append(RAW)
        if self.objects:
            missing += [k for k in (OBJECT_POSES, OBJECT_NAMES) if k not in observation]
        if missing:
            fix = (f" (render the episode: images are only present in rendered runs{'; ' + hint if hint else ''})"
                   if set(missing) & set(IMAGE_KEYS) else "")
            raise ShapeError(f"observation lacks {missing}; it has {sorted(observation)}{fix}.")
        lead: dict[str, tuple[int, ...]] = {}
        for key in self.images:
            shape, dtype = _layout(observation[key], key)
            if dtype != "uint8":
                raise DTypeError(f"observation[{key!r}] must be uint8 (0..255), got {dtype}.")
            if len(shape) not in (3, 4) or shape[-3:] != (self.image_size, self.image_size, 3):
                raise ShapeError(f"observation[{key!r}] must be [{self.image_size}, {self.image_size}, 3] or "
                                 f"[B, {self.image_size}, {self.image_size}, 3], got {list(shape)}.")
            lead[key] = shape[:-3]
        state = observation[STATE]
        shape, dtype = _layout(state, STATE)
        if not dtype.startswith(("float", "bfloat")):
            raise DTypeError(f"observation['state'] must be float32 [{self.proprio_dim}], got {dtype}.")
        if len(shape) not in (1, 2) or shape[-1] != self.proprio_dim:
            raise ShapeError(f"observation['state'] must be [{self.proprio_dim}] or [B, {self.proprio_dim}], "
                             f"got {list(shape)}.")
        if not bool(np.isfinite(state).all() if isinstance(state, np.ndarray) else state.isfinite().all()):
            raise NonFiniteError("observation['state'] contains NaN/inf.")
        lead[STATE] = shape[:-1]
        if self.objects:
            lead[OBJECT_POSES] = _check_objects(observation[OBJECT_POSES], observation[OBJECT_NAMES])
        if len(set(lead.values())) != 1:
            raise ShapeError(f"observation keys disagree on the batch: leading shapes {lead}; batch all keys or none.")
        if self.raw and not isinstance(observation[RAW], Mapping):
            raise DTypeError(f"observation['raw'] must be the simulator's observation dict, got "
                             f"{type(observation[RAW]).__name__}.")
        return observation

    def fake(self, seed: int = 0, *, batch: int | None = None) -> dict[str, Any]:
        """A valid observation with smooth, seeded images (gradients plus noise, like a rendered scene) and
        a proprio vector in a LIBERO-like range. ``raw`` (when the spec wants it) holds the proprio keys."""
        rng = np.random.default_rng(seed)
        lead = () if batch is None else (batch,)
        s = self.image_size
        yy, xx = np.mgrid[0:s, 0:s] * (255.0 / max(s - 1, 1))
        base = np.stack([yy, xx, 0.5 * (xx + yy)], axis=-1)  # [S, S, 3]
        obs: dict[str, Any] = {}
        for key in self.images:
            noise = rng.integers(-40, 41, (*lead, s, s, 3))
            obs[key] = np.clip(base + noise, 0, 255).astype(np.uint8)
        obs[STATE] = rng.uniform(-0.5, 0.5, (*lead, self.proprio_dim)).astype(np.float32)
        if self.objects:
            names = ("akita_black_bowl_1", "plate_1", "cookies_1")
            pos = rng.uniform(-0.3, 0.3, (*lead, len(names), 3))
            quat = rng.normal(size=(*lead, len(names), 4))
            quat /= np.linalg.norm(quat, axis=-1, keepdims=True)
            obs[OBJECT_POSES] = np.concatenate([pos, quat], axis=-1).astype(np.float32)
            obs[OBJECT_NAMES] = names
        if self.raw:
            obs[RAW] = {"robot0_eef_pos": rng.uniform(-0.3, 0.3, 3), "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),
                        "robot0_gripper_qpos": np.array([0.04, -0.04])}
        return obs


def _check_objects(poses: Any, names: Any) -> tuple[int, ...]:
    """Check ``object_poses`` [K, 7] / [B, K, 7] (float, finite) against ``object_names`` (K str); return the
    leading (batch) shape."""
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) and n for n in names):
        raise DTypeError(f"observation[{OBJECT_NAMES!r}] must be a tuple of non-empty object names, got {names!r}.")
    shape, dtype = _layout(poses, OBJECT_POSES)
    if not dtype.startswith(("float", "bfloat")):
        raise DTypeError(f"observation[{OBJECT_POSES!r}] must be float32 [K, {POSE_DIM}], got {dtype}.")
    if len(shape) not in (2, 3) or shape[-2:] != (len(names), POSE_DIM):
        raise ShapeError(f"observation[{OBJECT_POSES!r}] must be [K, {POSE_DIM}] or [B, K, {POSE_DIM}] with K = "
                         f"{len(names)} (one row per name in {OBJECT_NAMES!r}), got {list(shape)}.")
    if not bool(np.isfinite(poses).all() if isinstance(poses, np.ndarray) else poses.isfinite().all()):
        raise NonFiniteError(f"observation[{OBJECT_POSES!r}] contains NaN/inf.")
    return shape[:-2]


def _layout(value: Any, key: str) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a numpy array or a torch tensor (recognised without importing torch); DTypeError
    naming the key for anything else (a list, a scalar)."""
    if isinstance(value, np.ndarray):
        return value.shape, value.dtype.name
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "isfinite"):
        return tuple(value.shape), str(value.dtype).removeprefix("torch.")
    raise DTypeError(f"observation[{key!r}] must be a numpy array or torch.Tensor, got {type(value).__name__}.")

"""The OpenVLA-OFT LIBERO evaluation contract, as pure functions (no LIBERO, no MuJoCo).

Everything here follows OpenVLA-OFT's ``experiments/robot/libero/run_libero_eval.py`` and its helpers
(Kim et al., "Fine-Tuning Vision-Language-Action Models", arXiv:2502.19645): suites and step budgets,
the settle phase with a dummy action, image preprocessing, the prompt, the 8-d proprio vector and the
gripper post-processing. ``rsd.sim.libero`` (the env) and ``rsd.sim.episode`` (the loop) build on it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from rsd.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from rsd.normalize import model_to_env_gripper
from rsd.prompt import openvla_prompt
from rsd.suites import LIBERO_SUITES
from rsd.images import (  # re-exported: the protocol's image constants and steps
    CENTER_CROP_AREA,
    IMAGE_SIZE,
    JPEG_QUALITY,
    center_crop_image,
    oft_model_input,
    rotate_180,
)

# ---------------------------------------------------------------- protocol constants

SUITES: tuple[str, ...] = LIBERO_SUITES  # the one list (rsd.suites), also read by the checkpoint guard rails

# Steps the policy gets per episode (OFT's TASK_MAX_STEPS: the longest training demo per suite, padded).
TASK_MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}

NUM_STEPS_WAIT = 10  # dummy-action steps at the start of each episode so objects settle (no frames kept)
DUMMY_ACTION: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # no motion, gripper open
ACTION_DIM = 7  # [dx, dy, dz, droll, dpitch, dyaw, gripper]
PROPRIO_DIM = 8  # eef_pos 3 + axis-angle 3 + gripper_qpos 2
NUM_TRIALS_PER_TASK = 50  # trial i uses init state i
SEED = 7  # random / numpy / torch seed of the eval run
ENV_SEED = 0  # env.seed(0) once per task env
CAMERA_SIZE = 256  # env render resolution (OFT's env_img_res)
VIDEO_FPS = 30
AGENTVIEW_KEY = "agentview_image"
WRIST_KEY = "robot0_eye_in_hand_image"


def max_steps_for(suite: str) -> int:
    """Policy steps per episode for ``suite`` (the settle phase is extra, see ``total_steps_for``)."""
    if suite not in TASK_MAX_STEPS:
        raise ConfigError(f"Unknown LIBERO suite {suite!r}. Available: {', '.join(SUITES)}")
    return TASK_MAX_STEPS[suite]


def total_steps_for(suite: str) -> int:
    """Env steps per episode: ``max_steps_for(suite) + NUM_STEPS_WAIT``."""
    return max_steps_for(suite) + NUM_STEPS_WAIT


def dummy_action() -> np.ndarray:
    """The settle-phase action, float64 [7]: no motion, gripper open (-1)."""
    return np.array(DUMMY_ACTION, dtype=np.float64)


# ---------------------------------------------------------------- prompt

def prompt_for(instruction: str) -> str:
    """OpenVLA's prompt for a task instruction (``task.language``), lower-cased as OFT does (``rsd.prompt``)."""
    return openvla_prompt(instruction)


# ---------------------------------------------------------------- images
# The pixel pipeline lives in rsd.images (one step per function, each matched to OFT's TensorFlow op).


def preprocess_image(img: np.ndarray, size: int = IMAGE_SIZE, center_crop: bool = False,
                     rotate: bool = True) -> np.ndarray:
    """Raw LIBERO camera image -> policy input, exactly as OFT makes it (``rsd.images.oft_model_input``).

    uint8 [H, W, 3] -> rotate 180° (skip with ``rotate=False`` for an already rotated frame) -> JPEG q95 round
    trip decoded as TensorFlow does -> Lanczos-3 antialiased resize to ``size`` -> with ``center_crop`` the
    0.9-area centre crop resized back with OFT's rounding. The observation's images stop before the crop
    (OFT's ``prepare_observation``); a model trained with crop augmentation, as OFT's LIBERO checkpoints were,
    applies it (OFT's ``prepare_images_for_vla``): ``preprocess_image(img, center_crop=True)`` is that model's input.
    Returns a new uint8 [size, size, 3] array.
    """
    return oft_model_input(img, center_crop=center_crop, size=size, rotate=rotate)


# ---------------------------------------------------------------- proprio

def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w), robosuite's order -> axis-angle [3] (axis times angle, radians).

    Same arithmetic as ``robosuite.utils.transform_utils.quat2axisangle`` (which OFT uses), without
    mutating the input: w is clipped to [-1, 1]; angle = 2 acos(w) (no canonicalisation, so w < 0 gives
    angles above pi, as in training data); w = ±1 (no rotation) gives zeros.
    """
    q = np.asarray(quat, dtype=np.float64)
    if q.shape != (4,):
        raise ShapeError(f"quaternion must have shape (4,) in (x, y, z, w) order, got {q.shape}")
    if not np.all(np.isfinite(q)):
        raise NonFiniteError(f"quaternion has NaN/inf: {q}")
    w = float(np.clip(q[3], -1.0, 1.0))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3, dtype=np.float64)
    return q[:3] * 2.0 * math.acos(w) / den


_PROPRIO_KEYS: tuple[tuple[str, int], ...] = (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2))


def proprio_from_obs(obs: Mapping[str, Any]) -> np.ndarray:
    """Raw LIBERO obs -> OFT's proprio float32 [8]: eef_pos 3 + axis-angle(eef_quat) 3 + gripper_qpos 2."""
    parts = {}
    for key, n in _PROPRIO_KEYS:
        if key not in obs:
            raise ShapeError(f"observation lacks {key!r} (needed for proprio); keys: {sorted(obs)}")
        v = np.asarray(obs[key], dtype=np.float64)
        if v.shape != (n,):
            raise ShapeError(f"obs[{key!r}] must have shape ({n},), got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise NonFiniteError(f"obs[{key!r}] has NaN/inf: {v}")
        parts[key] = v
    state = np.concatenate([parts["robot0_eef_pos"], quat2axisangle(parts["robot0_eef_quat"]),
                            parts["robot0_gripper_qpos"]])
    return state.astype(np.float32)


def object_names(raw: Mapping[str, Any]) -> list[str]:
    """The objects whose pose LIBERO's raw obs reports (``<name>_pos`` and ``<name>_quat``; not the robot's
    ``robot0_*`` keys, not the relative ``*_to_robot0_eef_*`` ones), sorted."""
    names = []
    for key in raw:
        if key.endswith("_pos") and not key.startswith("robot0_") and "_to_robot0_eef" not in key:
            name = key[: -len("_pos")]
            if f"{name}_quat" in raw:
                names.append(name)
    return sorted(names)


def object_poses(raw: Mapping[str, Any], names: list[str] | tuple[str, ...]) -> np.ndarray:
    """Raw LIBERO obs -> float32 [K, 7]: ``<name>_pos`` 3 + ``<name>_quat`` 4 (x, y, z, w) per name, in order."""
    rows = []
    for name in names:
        pos = np.asarray(raw[f"{name}_pos"], dtype=np.float64)
        quat = np.asarray(raw[f"{name}_quat"], dtype=np.float64)
        if pos.shape != (3,) or quat.shape != (4,):
            raise ShapeError(f"obs[{name!r}_pos/_quat] must be (3,) and (4,), got {pos.shape} and {quat.shape}.")
        rows.append(np.concatenate([pos, quat]))
    poses = np.stack(rows) if rows else np.zeros((0, 7))
    if not np.isfinite(poses).all():
        raise NonFiniteError(f"object poses of {list(names)} contain NaN/inf.")
    return poses.astype(np.float32)


# ---------------------------------------------------------------- actions

def validate_action(action: Any) -> np.ndarray:
    """An env action: shape (7,), finite -> float64 copy. Raises ShapeError / NonFiniteError / DTypeError."""
    try:
        a = np.array(action, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DTypeError(f"action must be numeric, got {type(action).__name__}: {exc}") from exc
    if a.shape != (ACTION_DIM,):
        raise ShapeError(f"action must have shape ({ACTION_DIM},) [dx, dy, dz, droll, dpitch, dyaw, gripper], "
                         f"got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"action has NaN/inf: {a}")
    return a


def postprocess_gripper(actions: np.ndarray) -> np.ndarray:
    """Model gripper convention (0 = close, 1 = open) -> env convention (-1 = open, +1 = close), on whole actions.

    OFT's ``normalize_gripper_action(binarize=True)`` then ``invert_gripper_action``: ``g = sign(2g - 1)``,
    ``g = -g`` (``rsd.normalize.model_to_env_gripper``). Only the last dim changes; a new float32 array
    [..., 7] is returned. As in OFT, g = 0.5 exactly maps to 0.
    """
    a = np.array(actions, dtype=np.float32, copy=True)
    if a.ndim == 0 or a.shape[-1] != ACTION_DIM:
        raise ShapeError(f"actions must be [..., {ACTION_DIM}], got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError("actions have NaN/inf before gripper post-processing")
    a[..., -1] = model_to_env_gripper(a[..., -1])
    return a

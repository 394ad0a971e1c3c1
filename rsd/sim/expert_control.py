"""The scripted expert's low-level controller: one action per control step towards a target the phase machine set.

The phase machine of :class:`rsd.sim.experts.ScriptedExpert` decides, once per chunk of ``CHUNK_LEN`` steps, a
:class:`Command` (where the grip site should go, the gripper, the gain, the integral action of that chunk). This
module turns a command and an observed (or predicted) site pose into one env action::

    a[:3]  = cap(gain * (target - eef) + integral)      position delta in [-1, 1] (x 0.05 m, OSC_POSE)
    a[3:6] = clip(rot_gain * rotvec(ref_rot eef_rot^T) / 0.5 rad)   rotation towards the start orientation
    a[6]   = gripper, -1 open / +1 close

Closed loop, each step's action comes from that step's observation, with the error taken ``damping`` steps of
the site's observed velocity ahead (the arm lags its commands: without it the per-step law overshoots). Open
loop (:func:`rollout`), the steps after the first come from a predicted pose: the site moves
``STEP_M * RESPONSE * a[:3]`` and the orientation ``ROT_UNIT_RAD * RESPONSE * a[3:6]`` per step. ``RESPONSE`` was measured in LIBERO (OSC_POSE, 20 Hz control): a
constant action held for 8 steps moves the site 0.074-0.092 m per unit action (x and z, |a| from 0.1 to 1) and
turns the gripper 0.36-0.46 rad per unit action (roll and yaw, |a| 0.1 and 0.5), libero_object task 0 from init
state 0, i.e. 0.18-0.23 of the commanded 0.05 m (0.5 rad) per step; 0.21 is their mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CHUNK_LEN", "STEP_M", "ROT_UNIT_RAD", "RESPONSE", "Gains", "Command", "quat_to_mat", "mat_to_rotvec",
           "action", "rollout"]

CHUNK_LEN = 8  # C: actions per chunk (OpenVLA-OFT's open-loop chunk); the phase machine decides once per chunk
STEP_M = 0.05  # OSC_POSE: a[:3] = 1 moves the position goal 0.05 m
ROT_UNIT_RAD = 0.5  # OSC_POSE: a[3:6] = 1 rotates the orientation goal 0.5 rad
RESPONSE = 0.21  # fraction of the commanded move the site makes per step (measured, see the module docstring)


# ---------------------------------------------------------------- rotations (quaternions are x, y, z, w)


def quat_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def mat_to_rotvec(r: np.ndarray) -> np.ndarray:
    """Rotation matrix [3, 3] -> axis * angle [3] (angle in [0, pi])."""
    cos = float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))
    angle = math.acos(cos)
    if angle < 1e-9:
        return np.zeros(3)
    if math.pi - angle < 1e-6:  # 180°: axis from the symmetric part
        axis = np.sqrt(np.maximum((np.diag(r) + 1.0) / 2.0, 0.0))
        return axis * angle
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2.0 * math.sin(angle))
    return axis * angle


# ---------------------------------------------------------------- the control law


@dataclass(frozen=True)
class Gains:
    """The controller's constants (the expert's class attributes of the same names)."""

    min_action: float  # smallest commanded speed while the target is not reached
    floor_tol: float  # [m] no speed floor closer than this to the target
    rot_gain: float  # fraction of the orientation error commanded per step
    step_gain: float  # the command's gain is multiplied by this for per-step (re-observed) actions
    damping: float = 0.0  # [steps] closed loop: the error is taken this many steps of observed velocity ahead


@dataclass(frozen=True)
class Command:
    """What the phase machine decided for one chunk. ``integral`` [3] is the chunk's integral action (fixed)."""

    target: np.ndarray  # [3] site target [m]
    gripper: float
    gain: float  # action per metre of position error
    integral: np.ndarray  # [3]


def action(cmd: Command, eef: np.ndarray, rot_err: np.ndarray, gains: Gains,
           velocity: np.ndarray | None = None) -> np.ndarray:
    """One env action float64 [7] from the site position ``eef`` [3] and the world-frame rotation still to do
    ``rot_err`` [3] (axis * angle, ``mat_to_rotvec(ref_rot @ eef_rot.T)``). ``velocity`` [3] (m per step, observed)
    damps the approach: the error is taken where the site will be ``gains.damping`` steps ahead."""
    err = cmd.target - eef
    ahead = err if velocity is None else err - gains.damping * velocity
    pos = gains.step_gain * cmd.gain * ahead + cmd.integral
    peak = float(np.max(np.abs(pos)))
    if peak > 1.0:  # keep the direction, cap the speed
        pos = pos / peak
    elif gains.min_action > peak > 0.0 and float(np.linalg.norm(err)) > gains.floor_tol:
        pos = pos * (gains.min_action / peak)  # small commands barely move the arm: keep a floor
    rot = np.clip(gains.rot_gain * rot_err / ROT_UNIT_RAD, -1.0, 1.0)
    return np.concatenate([pos, rot, [cmd.gripper]])


def rollout(cmd: Command, eef: np.ndarray, rot_err: np.ndarray, gains: Gains, steps: int = CHUNK_LEN) -> np.ndarray:
    """Open loop: ``steps`` actions float64 [steps, 7], each from the pose the previous ones are predicted to reach
    (``RESPONSE`` of the commanded move per step)."""
    eef, rot_err = np.array(eef, dtype=np.float64), np.array(rot_err, dtype=np.float64)
    rows = []
    for _ in range(steps):
        a = action(cmd, eef, rot_err, gains)
        rows.append(a)
        eef = eef + STEP_M * RESPONSE * a[:3]
        rot_err = rot_err - ROT_UNIT_RAD * RESPONSE * a[3:6]
    return np.stack(rows)  # [steps, 7]

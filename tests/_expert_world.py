"""A point-mass stand-in for LIBERO that the scripted expert can solve (no LIBERO): privileged raw observations
of the alphabet-soup task and a site that moves ``response * 0.05 m`` per unit action and step.

Closing on the object within 1 cm of its grasp point holds it (except on the first attempt when ``slip_once``: the
fingers close on nothing); released objects fall into the basket if above it, else onto the floor. Used by the
expert's phase-machine tests (tests/sim/test_experts.py) and its per-step / open-loop tests
(tests/unit/test_expert_steps.py).
"""

from __future__ import annotations

import numpy as np

from rsd.sim.experts import PLANS, normalize_instruction

SOUP = "pick up the alphabet soup and place it in the basket"
BOWL = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def raw_obs(eef=(-0.15, 0.0, 0.25), opening=0.078, obj=(0.1, -0.2, 0.038), dest=(0.0, 0.26, -0.005),
            target="alphabet_soup_1", destination="basket_1") -> dict:
    return {
        "robot0_eef_pos": np.asarray(eef, dtype=np.float64),
        "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),  # (x, y, z, w): pointing down
        "robot0_gripper_qpos": np.array([opening / 2, -opening / 2]),
        f"{target}_pos": np.asarray(obj, dtype=np.float64),
        f"{destination}_pos": np.asarray(dest, dtype=np.float64),
    }


class KinematicWorld:
    """The soup task as a point mass (see the module docstring)."""

    def __init__(self, slip_once: bool = False, response: float = 0.25) -> None:
        self.plan = PLANS[normalize_instruction(SOUP)]
        self.response = response
        self.eef = np.array([-0.15, 0.0, 0.25])
        self.obj = np.array([0.1, -0.2, 0.038])
        self.dest = np.array([0.0, 0.26, -0.005])
        self.opening = 0.078
        self.held: np.ndarray | None = None
        self.slips_left = 1 if slip_once else 0
        self.missed = False  # this closing went past the object

    def raw(self) -> dict:
        return raw_obs(self.eef, self.opening, self.obj, self.dest)

    def step(self, action: np.ndarray) -> None:
        self.eef = self.eef + self.response * 0.05 * np.asarray(action[:3], dtype=np.float64)
        if action[6] > 0:  # closing
            grasp_pt = self.obj + np.asarray(self.plan.grasp.offset)
            if self.held is None and not self.missed and self.opening <= 0.07 \
                    and np.linalg.norm(self.eef - grasp_pt) < 0.01:
                if self.slips_left:
                    self.slips_left -= 1
                    self.missed = True
                else:
                    self.held = self.eef - self.obj
            width = 0.063 if self.held is not None else 0.0
            self.opening = max(width, self.opening - 0.01)
        else:
            self.opening = min(0.078, self.opening + 0.01)
            self.missed = False
            if self.held is not None:
                self.held = None
                inside = np.all(np.abs((self.obj - self.dest)[:2]) < 0.06)
                self.obj[2] = self.dest[2] + 0.05 if inside else 0.038
        if self.held is not None:
            self.obj = self.eef - self.held

    def placed(self) -> bool:
        return self.held is None and bool(np.all(np.abs((self.obj - self.dest)[:2]) < 0.06)) \
            and abs(self.obj[2] - (self.dest[2] + 0.05)) < 1e-9


def tiled(chunk: np.ndarray) -> bool:
    """True when every row of an action chunk ``[C, A]`` equals its first (one action repeated C times)."""
    chunk = np.asarray(chunk)
    return bool(np.all(chunk == chunk[:1]))

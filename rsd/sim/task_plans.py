"""The scripted experts' task table: one pick-and-place plan per libero_spatial and libero_object task.

A :class:`TaskPlan` names the object to grasp (its LIBERO body, ``<object>_pos`` / ``_quat`` in the raw
observation), how to grasp it (:class:`ObjectGrasp`, relative to the object's body origin) and where it
goes. :data:`PLANS` maps normalized instructions (LIBERO's ``task.language``) to plans; :func:`plan_for`
looks one up. Geometry was measured in LIBERO with MuJoCo 3.3.7 (``scripts/dev_expert.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from rsd.errors import ConfigError

__all__ = ["ObjectGrasp", "TaskPlan", "PLANS", "plan_for", "normalize_instruction"]



@dataclass(frozen=True)
class ObjectGrasp:
    """How to hold one object. Lengths in metres, world frame, relative to the object's body origin.

    ``offset``: where the grip site goes at the grasp (grasp point − object origin).
    ``bottom``: the object's lowest point − its origin, z (negative); used for clearances when carrying.
    ``yaw``: gripper rotation about world z from its start orientation [rad] (0: fingers close along world y).
    ``lift``: how far the site rises above the grasp point before it moves sideways [m].
    ``tolerance``: how close (xy and z, each) the site must get to the grasp point before closing [m].
    ``hover``: the site's height above the grasp point before it descends [m].
    """

    offset: tuple[float, float, float]
    bottom: float
    yaw: float = 0.0
    lift: float = 0.10
    tolerance: float = 0.008
    hover: float = 0.10


@dataclass(frozen=True)
class TaskPlan:
    """One pick-and-place task: move ``target`` onto/into ``destination`` (names as in LIBERO's obs keys).

    ``carry_clearance``: height of the object's bottom above the destination's origin while carrying.
    ``release_clearance``: the same at the moment the gripper opens.
    ``place_tolerance``: the xy distance between object and destination origins that counts as placed
    (``verify`` re-grasps beyond it; LIBERO's ``On`` needs < 0.03).
    """

    suite: str
    instruction: str
    target: str
    destination: str
    grasp: ObjectGrasp
    carry_clearance: float
    release_clearance: float
    place_tolerance: float


# libero_spatial: every task moves akita_black_bowl_1 onto plate_1 (the BDDL goal `(On akita_black_bowl_1
# plate_1)`; the instruction's spatial relation is resolved by the scene layout, the bowl meant is always _1).
# The bowl (origin at its base, rim 0.052 above it, rim radius ~0.047) is pinched at its +y rim: one finger
# inside the bowl, one outside, the site 0.025 below the rim top.
_BOWL_RIM = ObjectGrasp(offset=(0.0, 0.047, 0.027), bottom=0.0, tolerance=0.012)
# In the open top drawer (yaw ~155°) the walls leave 1.7-2.9 cm in front of/behind the bowl but ~5 cm to its
# sides, and reach 0.058 above the bowl's base: turn the fingers to close along the drawer's width (+65°), pinch
# the rim on the side facing world (+0.906, -0.423) with the site 0.030 from the centre (the open fingers reach
# 0.065 either side of the site), high enough (0.035) that the palm (0.030 above the site) clears the walls.
_BOWL_IN_DRAWER = ObjectGrasp(offset=(0.027, -0.013, 0.035), bottom=0.0, yaw=math.radians(65.0), lift=0.12,
                               tolerance=0.010)
# On the wooden cabinet the bowl (base at z ~1.13) is near the top of the arm's reach: hover and lift less.
_BOWL_ON_CABINET = ObjectGrasp(offset=(0.0, 0.047, 0.027), bottom=0.0, tolerance=0.012, hover=0.06, lift=0.06)
# (On the stove, pinching 0.030 below the rim instead of 0.025 measured 45/50 against 49/50: not used.)
_SPATIAL_GRASPS = {"in the top drawer of the wooden cabinet": _BOWL_IN_DRAWER, "on the wooden cabinet": _BOWL_ON_CABINET}
_SPATIAL_WHERE = (
    "between the plate and the ramekin",
    "next to the ramekin",
    "from table center",
    "on the cookie box",
    "in the top drawer of the wooden cabinet",
    "on the ramekin",
    "next to the cookie box",
    "on the stove",
    "next to the plate",
    "on the wooden cabinet",
)

# libero_object: "<object>_1" into basket_1 (goal `(In <object>_1 basket_1_contain_region)`). Origins are the
# objects' centres; the grip site goes near the middle (low for the flat boxes lying on the floor, whose
# fingertips must stop above the floor).
_OBJECT_GRASPS: dict[str, tuple[str, ObjectGrasp]] = {
    "alphabet soup": ("alphabet_soup_1", ObjectGrasp(offset=(0.0, 0.0, 0.010), bottom=-0.038)),
    # the tomato sauce can stands ~(+0.05, -0.10) from the cream cheese, under the palm (0.20 m wide along y,
    # 0.03 above the site): grasp the 0.081 m long box 0.025 off centre, away from the can
    "cream cheese": ("cream_cheese_1", ObjectGrasp(offset=(-0.025, 0.0, 0.005), bottom=-0.009)),
    "salad dressing": ("salad_dressing_1", ObjectGrasp(offset=(0.0, 0.0, 0.010), bottom=-0.073)),
    "bbq sauce": ("bbq_sauce_1", ObjectGrasp(offset=(0.0, 0.0, 0.010), bottom=-0.055)),
    "ketchup": ("ketchup_1", ObjectGrasp(offset=(0.0, 0.0, 0.010), bottom=-0.072)),
    "tomato sauce": ("tomato_sauce_1", ObjectGrasp(offset=(0.0, 0.0, 0.010), bottom=-0.038)),
    "butter": ("butter_1", ObjectGrasp(offset=(0.0, 0.0, 0.005), bottom=-0.009)),
    "milk": ("milk_1", ObjectGrasp(offset=(0.0, 0.0, 0.010), bottom=-0.070)),
    "chocolate pudding": ("chocolate_pudding_1", ObjectGrasp(offset=(0.0, 0.0, 0.006), bottom=-0.013)),
    "orange juice": ("orange_juice_1", ObjectGrasp(offset=(0.0, 0.0, 0.010), bottom=-0.070)),
}


def normalize_instruction(instruction: str) -> str:
    """Lower case, single spaces, no trailing period: the key of :data:`PLANS`."""
    if not isinstance(instruction, str):
        raise ConfigError(f"instruction must be a string, got {type(instruction).__name__}")
    return " ".join(instruction.lower().strip().rstrip(".").split())


def _build_plans() -> dict[str, TaskPlan]:
    plans: list[TaskPlan] = []
    for where in _SPATIAL_WHERE:
        plans.append(TaskPlan(
            suite="libero_spatial", instruction=f"pick up the black bowl {where} and place it on the plate",
            target="akita_black_bowl_1", destination="plate_1",
            grasp=_SPATIAL_GRASPS.get(where, _BOWL_RIM),
            carry_clearance=0.10, release_clearance=0.025, place_tolerance=0.03))
    for what, (target, grasp) in _OBJECT_GRASPS.items():
        plans.append(TaskPlan(
            suite="libero_object", instruction=f"pick up the {what} and place it in the basket",
            target=target, destination="basket_1", grasp=grasp,
            carry_clearance=0.17, release_clearance=0.06, place_tolerance=0.05))
    table = {normalize_instruction(p.instruction): p for p in plans}
    assert len(table) == len(plans), "duplicate instructions in the expert's task table"
    return table


PLANS: dict[str, TaskPlan] = _build_plans()


def plan_for(instruction: str, plans: Mapping[str, TaskPlan] | None = None) -> TaskPlan:
    """The plan of a task instruction (LIBERO's ``task.language``, any case). Unknown -> ConfigError."""
    plans = PLANS if plans is None else plans
    key = normalize_instruction(instruction)
    if key not in plans:
        known = "\n  ".join(sorted(plans))
        raise ConfigError(f"ScriptedExpert has no plan for the instruction {instruction!r}. Known instructions:\n  "
                          f"{known}")
    return plans[key]

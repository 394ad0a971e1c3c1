"""rsd.sim.experts: the scripted privileged expert.

The first tests need no LIBERO (task table, input checks, and the phase machine driven by a small kinematic
world, a missed grasp included); the last ones run real unrendered LIBERO episodes under the protocol
(``rsd.sim.episode.run_episode``): 2 init states for each of the 20 tasks, pooled per suite.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/sim/test_experts.py -q`` (the LIBERO part takes
about 4-6 min on 2 CPU cores: 40 episodes of ~4 s plus 20 env creations).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from rsd.errors import ConfigError, NonFiniteError, ShapeError
from rsd.policy.protocol import ActionChunk, Policy
from rsd.sim.experts import PLANS, ScriptedExpert, normalize_instruction, plan_for
from rsd.stats import wilson_interval

pytestmark = pytest.mark.sim

SOUP = "pick up the alphabet soup and place it in the basket"
BOWL = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def _raw(eef=(-0.15, 0.0, 0.25), opening=0.078, obj=(0.1, -0.2, 0.038), dest=(0.0, 0.26, -0.005),
         target="alphabet_soup_1", destination="basket_1") -> dict:
    return {
        "robot0_eef_pos": np.asarray(eef, dtype=np.float64),
        "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),  # (x, y, z, w): pointing down
        "robot0_gripper_qpos": np.array([opening / 2, -opening / 2]),
        f"{target}_pos": np.asarray(obj, dtype=np.float64),
        f"{destination}_pos": np.asarray(dest, dtype=np.float64),
    }


# ---------------------------------------------------------------- without LIBERO


def test_task_table_has_ten_tasks_per_suite() -> None:
    suites = [p.suite for p in PLANS.values()]
    assert suites.count("libero_spatial") == 10 and suites.count("libero_object") == 10 and len(PLANS) == 20
    assert {p.target for p in PLANS.values() if p.suite == "libero_spatial"} == {"akita_black_bowl_1"}
    assert len({p.target for p in PLANS.values() if p.suite == "libero_object"}) == 10


def test_unknown_instruction_raises_and_lists_the_known_ones() -> None:
    expert = ScriptedExpert()
    with pytest.raises(ConfigError, match="no plan for the instruction") as info:
        expert.predict_chunk({"raw": _raw()}, "pick up the teapot and place it in the basket")
    for plan in PLANS.values():
        assert plan.instruction in str(info.value)


def test_instruction_lookup_ignores_case_spaces_and_period() -> None:
    assert plan_for("Pick up the  Alphabet Soup and place it in the basket.") is PLANS[normalize_instruction(SOUP)]


def test_chunk_is_env_ready_and_carries_the_phase() -> None:
    expert = ScriptedExpert()
    assert isinstance(expert, Policy)
    chunk = expert.predict_chunk({"raw": _raw()}, SOUP)
    assert isinstance(chunk, ActionChunk)
    assert chunk.actions.shape == (8, 7) and chunk.actions.dtype == np.float32
    assert np.all(np.abs(chunk.actions) <= 1.0)
    assert np.all(chunk.actions[:, 6] == -1.0)  # approaching: gripper open
    assert chunk.info["phase"] == "approach" and chunk.info["attempt"] == 1
    assert chunk.info["target"] == "alphabet_soup_1" and chunk.info["destination"] == "basket_1"
    # the object is at +x, -y and below: the first move heads there (after rising, if below the hover height)
    assert chunk.actions[0, 0] > 0 and chunk.actions[0, 1] < 0


def test_missing_or_nonfinite_privileged_obs_raises() -> None:
    expert = ScriptedExpert()
    with pytest.raises(ShapeError, match="raw"):
        expert.predict_chunk({"state": np.zeros(8, np.float32)}, SOUP)
    raw = _raw()
    del raw["basket_1_pos"]
    with pytest.raises(ShapeError, match="basket_1_pos"):
        expert.predict_chunk({"raw": raw}, SOUP)
    with pytest.raises(NonFiniteError):
        expert.predict_chunk({"raw": _raw(obj=(np.nan, 0.0, 0.0))}, SOUP)


def test_instruction_change_within_an_episode_raises_until_reset() -> None:
    expert = ScriptedExpert()
    expert.predict_chunk({"raw": _raw()}, SOUP)
    bowl_raw = _raw(target="akita_black_bowl_1", destination="plate_1")
    with pytest.raises(ConfigError, match="reset"):
        expert.predict_chunk({"raw": bowl_raw}, BOWL)
    expert.reset()
    assert expert.predict_chunk({"raw": bowl_raw}, BOWL).info["phase"] == "approach"


class KinematicWorld:
    """A point-mass stand-in for LIBERO: the site moves 0.25 x 0.05 m per unit action and step; closing on the
    object within 1 cm of its grasp point holds it (except on the first attempt when ``slip_once``: the
    fingers close on nothing); released objects fall into the basket if above it, else onto the floor."""

    def __init__(self, slip_once: bool) -> None:
        self.plan = PLANS[normalize_instruction(SOUP)]
        self.eef = np.array([-0.15, 0.0, 0.25])
        self.obj = np.array([0.1, -0.2, 0.038])
        self.dest = np.array([0.0, 0.26, -0.005])
        self.opening = 0.078
        self.held: np.ndarray | None = None
        self.slips_left = 1 if slip_once else 0
        self.missed = False  # this closing went past the object

    def raw(self) -> dict:
        return _raw(self.eef, self.opening, self.obj, self.dest)

    def step(self, action: np.ndarray) -> None:
        self.eef = self.eef + 0.25 * 0.05 * np.asarray(action[:3], dtype=np.float64)
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


@pytest.mark.parametrize("slip_once", [False, True])
def test_phase_machine_places_the_object_and_retries_a_missed_grasp(slip_once: bool) -> None:
    world, expert = KinematicWorld(slip_once), ScriptedExpert()
    phases, attempts = [], []
    for _ in range(280 // 8):
        chunk = expert.predict_chunk({"raw": world.raw()}, SOUP)
        assert np.all(np.abs(chunk.actions) <= 1.0)
        phases.append(chunk.info["phase"])
        attempts.append(chunk.info["attempt"])
        for action in chunk.actions:
            world.step(action)
        if world.placed():
            break
    assert world.placed(), f"object at {world.obj} not in the basket at {world.dest}; phases {phases}"
    order = [phases.index(p) for p in ("approach", "descend", "grasp", "lift", "carry", "lower", "release")]
    assert order == sorted(order), phases
    assert ("regrasp" in phases) == slip_once and max(attempts) == (2 if slip_once else 1)


# ---------------------------------------------------------------- LIBERO

_needs_libero = pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                                   reason="LIBERO is not installed: run `bash scripts/setup.sh`")
INIT_STATES = (0, 1)  # trial i uses init state i
MIN_WILSON_LOW = 0.75  # 20/20 -> 0.839, 19/20 -> 0.764, 18/20 -> 0.699 (rsd.stats.wilson_interval, z = 1.96)


@_needs_libero
@pytest.mark.parametrize("suite", ["libero_spatial", "libero_object"])
def test_plans_match_the_bddl_goals(suite: str) -> None:
    """Every task instruction has a plan, and the plan moves the BDDL's objects of interest."""
    from rsd.sim.libero import list_tasks

    for task in list_tasks(suite):
        plan = plan_for(task.instruction)
        bddl = Path(task.bddl_file).read_text()
        interest = re.search(r"\(:obj_of_interest\s+([^)]*)\)", bddl)
        goal = re.search(r"\(:goal\s+\(And\s+\((\w+)\s+(\w+)\s+(\w+)\)", bddl)
        assert interest is not None and goal is not None, task.bddl_file
        assert interest.group(1).split() == [plan.target, plan.destination], task.name
        assert goal.group(2) == plan.target and goal.group(3).startswith(plan.destination), task.name


@_needs_libero
@pytest.mark.parametrize("suite", ["libero_spatial", "libero_object"])
def test_expert_solves_every_task(suite: str) -> None:
    """2 unrendered protocol episodes per task; the pooled Wilson 95% lower bound must reach 0.75."""
    from rsd.sim import protocol
    from rsd.sim.episode import run_episode
    from rsd.sim.libero import make_env

    expert, results = ScriptedExpert(), {}
    for task_id in range(10):
        with make_env(suite, task_id, render=False) as env:
            for i in INIT_STATES:
                out = run_episode(env, expert, env.task.instruction, i, protocol.max_steps_for(suite))
                if out.exception is not None:
                    raise out.exception
                results[(task_id, i)] = (out.success, out.steps)
    wins = sum(ok for ok, _ in results.values())
    low, _ = wilson_interval(wins, len(results))
    failed = {key: steps for key, (ok, steps) in results.items() if not ok}
    assert low >= MIN_WILSON_LOW, f"{suite}: {wins}/{len(results)} (Wilson low {low:.3f}); failed (task, init): {failed}"

"""Scripted privileged experts for every libero_spatial and libero_object task.

:class:`ScriptedExpert` implements the :class:`rsd.policy.Policy` protocol. It reads only the privileged
part of the observation, ``observation["raw"]`` (object poses ``<object>_pos`` / ``_quat``, ``robot0_eef_pos``,
``robot0_eef_quat``, ``robot0_gripper_qpos``), and the instruction, which selects a :class:`TaskPlan` from
:data:`PLANS`. Actions are env-ready (``rsd.sim.expert_control``)::

    a[:3]  position delta in [-1, 1] (x 0.05 m, OSC_POSE)   a[3:6] rotation that holds the start orientation
    a[6]   gripper, -1 open / +1 close

Two entry points share one phase machine and one control law:

- ``predict_chunk`` (the Policy protocol; ``rsd eval --policy expert``): ``C = 8`` actions run open loop, the
  first from the observation, the next 7 from the site pose the previous ones are predicted to reach
  (``expert_control.rollout``): 8 actions that slow down as the site is predicted to near its target (equal
  only where the command sits at a speed limit or at rest: in LIBERO the arm's own motion bends every path);
- ``predict_step`` (demonstrations; :class:`StepwiseExpert` is it as a Policy of 1-action chunks): one action per
  control step (20 Hz), each from that step's observation (and the site's observed velocity, which damps it).

The pick-and-place state machine decides its phase and the chunk's :class:`~rsd.sim.expert_control.Command`
from the observed state once every ``C = 8`` steps (its counters and timeouts count chunks)::

    approach -> descend -> grasp -> lift -> carry -> lower -> release -> retreat -> verify
       ^                              |        |                                      |
       +------------- regrasp <-------+--------+---------- (object not placed) -------+

``lift`` and ``carry`` check that the object follows the gripper (a closed gripper with nothing in it, or an
object left behind, is a missed grasp) and ``verify`` checks that it landed on the destination; either sends
the expert back to ``approach`` for another attempt, with fresh object poses.

Geometry (measured in LIBERO with MuJoCo 3.3.7, see ``scripts/dev_expert.py``): the grip site
``robot0_eef_pos`` sits at the height of the finger pads, whose inner faces are 0.076 m apart when open and
close along world y; the fingertips reach 0.013 m below the site. Each grasp is given relative to the
object's body origin (the ``<object>_pos`` LIBERO reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from rsd.errors import ConfigError, NonFiniteError, ShapeError
from rsd.observation import RAW
from rsd.policy.protocol import ActionChunk
from rsd.sim import expert_control as control
from rsd.sim.expert_control import CHUNK_LEN, Command, mat_to_rotvec, quat_to_mat
from rsd.sim.task_plans import PLANS, ObjectGrasp, TaskPlan, normalize_instruction, plan_for

__all__ = ["ObjectGrasp", "TaskPlan", "PLANS", "ScriptedExpert", "StepwiseExpert", "plan_for",
           "normalize_instruction", "PHASES", "CHUNK_LEN"]

OPEN, CLOSE = -1.0, 1.0

PHASES: tuple[str, ...] = ("approach", "descend", "grasp", "lift", "carry", "lower", "release", "retreat",
                           "verify", "regrasp")

# ---------------------------------------------------------------- the expert


@dataclass(frozen=True)
class _Obs:
    eef: np.ndarray  # [3]
    eef_rot: np.ndarray  # [3, 3]
    opening: float  # finger gap from gripper_qpos (q0 - q1), ~0.078 open
    target: np.ndarray  # [3] object origin
    destination: np.ndarray  # [3]


def _read(raw: Mapping[str, Any], key: str, n: int) -> np.ndarray:
    if key not in raw:
        raise ShapeError(f"observation[{RAW!r}] lacks {key!r}; the scripted expert needs LIBERO's privileged obs "
                         f"(object poses). Keys present: {sorted(raw)}")
    v = np.asarray(raw[key], dtype=np.float64)
    if v.shape != (n,):
        raise ShapeError(f"observation[{RAW!r}][{key!r}] must have shape ({n},), got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise NonFiniteError(f"observation[{RAW!r}][{key!r}] has NaN/inf: {v}")
    return v


class ScriptedExpert:
    """Privileged pick-and-place expert for the 20 libero_spatial / libero_object tasks (Policy protocol).

    ``predict_chunk(observation, instruction)`` -> :class:`ActionChunk` with 8 float32 actions ``[8, 7]`` for open
    loop execution; ``predict_step(observation, instruction)`` -> one action ``[1, 7]`` per control step, closed
    loop (the phase machine decides on every 8th call). ``info = {"phase", "attempt", "target", "destination",
    "num_calls"}``. ``reset()`` clears the episode state; call it at the start of every episode (one entry point
    per episode). ``plans`` replaces the built-in task table (keys: normalized instructions).
    """

    # controller (a constant action held over 8 steps moves the site ~0.085 m per unit action: expert_control)
    move_gain = 8.0  # action per metre of position error
    fine_gain = 6.0  # slower near objects
    # the gains above are multiplied by this in the per-step law (expert_control.action). A constant action held
    # for a chunk (0.085 m per unit action) leaves 1 - 8 x 0.085 = 0.32 of the error with move_gain; the law
    # re-applied every step (0.05 m x RESPONSE = 0.0105 m per unit action and step) leaves (1 - 0.0105 g)^8 of
    # it, 0.34 for g = 1.5 move_gain. Measured on benchmark init states 0-9 of libero_spatial tasks
    # 0, 4, 9 (open-loop chunks): 1.0 -> 29/30 in 159.5 steps, 1.5 -> 30/30 in 141.7, 2.0 -> 30/30 in 134.0;
    # the tiled chunks it replaces took 140.9 there.
    step_gain = 1.5
    # closed loop (predict_step) the error is taken where the site will be this many steps of its observed velocity
    # ahead: the arm lags its commands (after a unit command stops, the site drifts on ~2 steps' worth in x, ~1 in
    # z). Fresh scenes 1000-1029 of libero_spatial task 2 (release on the plate is sensitive to overshoot):
    # 0 -> 23/30, 1 -> 27/30, 2 -> 28/30 (the open-loop chunks: 30/30)
    damping = 2.0
    min_action = 0.12  # smallest commanded speed while the target is not reached
    integral_gain = 3.0  # action per metre of summed per-chunk error (reset at each phase change)
    integral_max = 0.5
    integral_zone = 0.03  # [m]
    rot_gain = 0.3  # fraction of the orientation error commanded per step
    # thresholds
    reach_tol = 0.008  # a point reached [m] (the grasp point: TaskPlan.grasp.tolerance)
    xy_tol = 0.010  # above a point [m]
    rot_tol = 0.08  # orientation reached [rad]
    funnel = 4.0  # descending: allowed height above the goal per metre of xy error
    stall = 0.002  # the site moved less than this over one chunk: blocked [m]
    empty_opening = 0.0025  # finger gap below this after closing: nothing between the fingers [m]
    # (closing on nothing: 0.0030 after 8 steps, 0.0019 after 14, 0.0010 after 29; a bowl rim: 0.009-0.013 at
    # the start of the lift, then slowly less, 0.004 after ~100 steps: so only the lift checks the gap)
    follow_tol = 0.03  # object further than this from where the grasp held it: dropped [m]
    grasp_chunks = 2  # chunks spent closing the gripper
    release_chunks = 2  # chunks spent opening it
    max_phase_chunks = 8  # a phase that has not finished after this many chunks moves on / retries

    def __init__(self, plans: Mapping[str, TaskPlan] | None = None) -> None:
        self.plans = dict(PLANS if plans is None else plans)
        self.reset()

    # -- the protocol

    def reset(self) -> None:
        self._plan: TaskPlan | None = None
        self._mode: str | None = None  # "chunk" or "step": the entry point this episode uses
        self._phase = "approach"
        self._phase_chunks = 0
        self._attempt = 1
        self._ref_rot: np.ndarray | None = None
        self._last_eef: np.ndarray | None = None
        self._lift_start: tuple[np.ndarray, np.ndarray] | None = None  # eef, object at the start of the lift
        self._held: np.ndarray | None = None  # eef - object while carrying [3]
        self._release_at: np.ndarray | None = None  # site position when the gripper opened [3]
        self._err_sum = np.zeros(3)  # position error summed over this phase's chunks (integral action) [m]
        self._command: Command | None = None  # this chunk's decision
        self._steps = 0  # predict_step calls this episode
        self._prev_eef: np.ndarray | None = None  # the site at the previous predict_step [3]
        self.num_calls = 0

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        """8 actions ``[8, 7]`` run open loop: a fresh decision, then the control law rolled forward on the site
        pose its own actions are predicted to reach (``expert_control.rollout``)."""
        plan, obs = self._begin(observation, instruction, "chunk")
        command = self._decide_chunk(obs, plan)
        actions = control.rollout(command, obs.eef, self._rot_vec(obs), self._gains())  # [8, 7]
        return self._answer(actions, plan)

    def predict_step(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        """One action ``[1, 7]`` from this step's observation; the phase machine decides on every 8th call."""
        plan, obs = self._begin(observation, instruction, "step")
        if self._steps % CHUNK_LEN == 0:
            self._decide_chunk(obs, plan)
        self._steps += 1
        velocity = None if self._prev_eef is None else obs.eef - self._prev_eef  # [3] m per step
        self._prev_eef = obs.eef
        assert self._command is not None
        a = control.action(self._command, obs.eef, self._rot_vec(obs), self._gains(), velocity)
        return self._answer(a[None, :], plan)  # [1, 7]

    def _begin(self, observation: Mapping[str, Any], instruction: str, mode: str) -> tuple[TaskPlan, _Obs]:
        plan = plan_for(instruction, self.plans)
        if self._plan is None:
            self._plan = plan
        elif plan is not self._plan:
            raise ConfigError(f"instruction changed within an episode ({self._plan.instruction!r} -> "
                              f"{plan.instruction!r}); call reset() between episodes")
        if self._mode is None:
            self._mode = mode
        elif mode != self._mode:
            raise ConfigError(f"predict_{mode} after predict_{self._mode} within one episode; call reset() "
                              f"between episodes and use one entry point per episode")
        if not isinstance(observation, Mapping) or RAW not in observation:
            raise ShapeError(f"the scripted expert needs observation[{RAW!r}] (LIBERO's privileged obs dict)")
        obs = self._observe(observation[RAW], plan)
        if self._ref_rot is None:
            yaw = plan.grasp.yaw
            c, s_ = math.cos(yaw), math.sin(yaw)
            self._ref_rot = np.array([[c, -s_, 0.0], [s_, c, 0.0], [0.0, 0.0, 1.0]]) @ obs.eef_rot
        return plan, obs

    def _answer(self, actions: np.ndarray, plan: TaskPlan) -> ActionChunk:
        self.num_calls += 1
        info = {"phase": self._phase, "attempt": self._attempt, "target": plan.target,
                "destination": plan.destination, "num_calls": self.num_calls}
        return ActionChunk(actions=actions.astype(np.float32), info=info)

    # -- observation

    @staticmethod
    def _observe(raw: Mapping[str, Any], plan: TaskPlan) -> _Obs:
        q = _read(raw, "robot0_gripper_qpos", 2)
        return _Obs(eef=_read(raw, "robot0_eef_pos", 3), eef_rot=quat_to_mat(_read(raw, "robot0_eef_quat", 4)),
                    opening=float(q[0] - q[1]), target=_read(raw, f"{plan.target}_pos", 3),
                    destination=_read(raw, f"{plan.destination}_pos", 3))

    # -- the state machine

    def _enter(self, phase: str) -> None:
        assert phase in PHASES, phase
        self._phase = phase
        self._phase_chunks = 0
        self._err_sum = np.zeros(3)

    def _rot_error(self, obs: _Obs) -> float:
        return float(np.linalg.norm(self._rot_vec(obs)))

    def _moved(self, obs: _Obs) -> float:
        return math.inf if self._last_eef is None else float(np.linalg.norm(obs.eef - self._last_eef))

    def _carry_z(self, obs: _Obs, plan: TaskPlan, clearance: float) -> float:
        """Grip-site z that puts the held object's bottom ``clearance`` above the destination origin."""
        held_z = self._held[2] if self._held is not None else plan.grasp.offset[2]
        return float(obs.destination[2] + clearance - plan.grasp.bottom + held_z)

    def _travel_z(self, obs: _Obs, plan: TaskPlan) -> float:
        """Site z while the object travels: clear of the destination and of where it was picked up."""
        assert self._lift_start is not None
        return max(self._carry_z(obs, plan, plan.carry_clearance), float(self._lift_start[0][2]) + plan.grasp.lift)

    def _decide(self, obs: _Obs, plan: TaskPlan) -> tuple[np.ndarray, float, float]:
        """Advance the phase from the observed state; return (site target [3], gripper, gain) for the chunk."""
        grasp_pt = obs.target + np.asarray(plan.grasp.offset)
        for _ in range(len(PHASES) + 1):  # phases that finish on entry fall through to the next
            phase, n = self._phase, self._phase_chunks
            if phase == "approach":
                hover_z = grasp_pt[2] + plan.grasp.hover
                if obs.eef[2] < hover_z - 0.03:  # rise first, straight up
                    return np.array([obs.eef[0], obs.eef[1], hover_z]), OPEN, self.move_gain
                above = np.array([grasp_pt[0], grasp_pt[1], hover_z])
                err = above - obs.eef
                if np.linalg.norm(err[:2]) < 2 * self.xy_tol and abs(err[2]) < 0.03 \
                        and self._rot_error(obs) < self.rot_tol:  # descend corrects xy
                    self._enter("descend")
                    continue
                return above, OPEN, self.move_gain
            if phase == "descend":
                # a funnel: the site may go lower only as the xy error shrinks (drift never lands a finger on it)
                tol = plan.grasp.tolerance
                xy_err = float(np.linalg.norm((grasp_pt - obs.eef)[:2]))
                goal = grasp_pt + np.array([0.0, 0.0, min(plan.grasp.hover, self.funnel * max(0.0, xy_err - tol))])
                blocked = n >= 1 and self._moved(obs) < self.stall
                if (xy_err < tol and abs(grasp_pt[2] - obs.eef[2]) < tol) or blocked or n >= self.max_phase_chunks:
                    self._enter("grasp")
                    continue
                return goal, OPEN, self.fine_gain
            if phase == "grasp":
                if n >= self.grasp_chunks:
                    self._lift_start = (obs.eef, obs.target)
                    self._enter("lift")
                    continue
                return grasp_pt if n == 0 else obs.eef, CLOSE, self.fine_gain
            if phase == "lift":
                assert self._lift_start is not None
                eef0, obj0 = self._lift_start
                if obs.opening < self.empty_opening:
                    self._enter("regrasp")
                    continue
                rose = obs.eef[2] - eef0[2]
                if rose > 0.03 and (obs.target[2] - obj0[2]) < 0.5 * rose:  # the object stays behind
                    self._enter("regrasp")
                    continue
                lift_z = self._travel_z(obs, plan)
                if obs.eef[2] > lift_z - 0.02 or n >= self.max_phase_chunks:
                    self._held = obs.eef - obs.target
                    self._enter("carry")
                    continue
                return np.array([eef0[0], eef0[1], lift_z]), CLOSE, self.move_gain
            if phase in ("carry", "lower"):
                assert self._held is not None
                if phase == "carry" and np.linalg.norm(obs.eef - obs.target - self._held) > self.follow_tol:
                    self._enter("regrasp")  # dropped on the way (while lowering, landing moves it: no check)
                    continue
                xy = obs.destination[:2] + self._held[:2]
                xy_err = float(np.linalg.norm(xy - obs.eef[:2]))
                travel_z = self._travel_z(obs, plan)
                release_z = self._carry_z(obs, plan, plan.release_clearance)
                # the same funnel: come down only as the object closes in on the destination
                goal_z = release_z + min(travel_z - release_z, self.funnel * max(0.0, xy_err - self.xy_tol))
                if phase == "carry" and goal_z < travel_z - 0.01:
                    self._enter("lower")
                    continue
                if phase == "carry":
                    return np.array([xy[0], xy[1], travel_z]), CLOSE, self.move_gain
                blocked = n >= 1 and self._moved(obs) < self.stall
                if (xy_err < 2 * self.xy_tol and abs(release_z - obs.eef[2]) < 2 * self.reach_tol) or blocked \
                        or n >= self.max_phase_chunks:
                    self._enter("release")
                    continue
                return np.array([xy[0], xy[1], goal_z]), CLOSE, self.move_gain
            if phase == "release":
                if n >= self.release_chunks:
                    self._release_at = obs.eef
                    self._enter("retreat")
                    continue
                return obs.eef, OPEN, self.fine_gain
            if phase == "retreat":
                assert self._release_at is not None
                goal = self._release_at + np.array([0.0, 0.0, 0.08])
                if obs.eef[2] > goal[2] - 0.02 or n >= self.max_phase_chunks:
                    self._enter("verify")
                    continue
                return goal, OPEN, self.move_gain
            if phase == "verify":
                # hold still; if the object is not on/in the destination, pick it up again
                if np.linalg.norm((obs.target - obs.destination)[:2]) > plan.place_tolerance and n >= 1:
                    self._enter("regrasp")
                    continue
                return obs.eef, OPEN, self.fine_gain
            if phase == "regrasp":
                # open, back off upwards, then start over from fresh poses
                if n >= 1:
                    self._attempt += 1
                    self._held = None
                    self._lift_start = None
                    self._enter("approach")
                    continue
                return obs.eef + np.array([0.0, 0.0, 0.05]), OPEN, self.move_gain
            raise AssertionError(f"unhandled phase {phase!r}")
        raise AssertionError(f"phase machine did not settle (phase {self._phase!r})")

    # -- the chunk's command

    def _gains(self) -> control.Gains:
        return control.Gains(min_action=self.min_action, floor_tol=self.reach_tol / 2, rot_gain=self.rot_gain,
                             step_gain=self.step_gain, damping=self.damping)

    def _rot_vec(self, obs: _Obs) -> np.ndarray:
        """World-frame rotation from the site's orientation to the one held [3] (axis * angle)."""
        assert self._ref_rot is not None
        return mat_to_rotvec(self._ref_rot @ obs.eef_rot.T)

    def _decide_chunk(self, obs: _Obs, plan: TaskPlan) -> Command:
        """The phase machine's decision for the next ``CHUNK_LEN`` steps, with the integral action of the chunk.

        The integral term matters where the arm is stretched out: there small commands barely move it.
        """
        target, gripper, gain = self._decide(obs, plan)
        self._phase_chunks += 1
        err = target - obs.eef
        if float(np.linalg.norm(err)) < self.integral_zone:  # only near the target: no wind-up on long moves
            self._err_sum = self._err_sum + err
        integral = np.clip(self.integral_gain * self._err_sum, -self.integral_max, self.integral_max)
        self._command = Command(target=target, gripper=gripper, gain=gain, integral=integral)
        self._last_eef = obs.eef
        return self._command


class StepwiseExpert(ScriptedExpert):
    """The expert as a Policy of one-action chunks: ``predict_chunk`` is ``predict_step``, so the episode loop
    (``rsd.sim.episode.run_episode``) queries it at every control step. ``rsd collect --policy expert`` records
    its demonstrations with it."""

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        return self.predict_step(observation, instruction)

"""The observations a recorded episode saw, re-created from its recorded states without re-running its physics.

What robosuite hands a policy after a control step is not the state at the end of that step. One control step is
25 physics substeps (20 Hz control, 2 ms substeps); every observable (cameras and proprio) is *sampled* at the first
substep of its 50 ms sampling period, when its timer allows (``robosuite.utils.observables.Observable.update``),
and ``env.step`` returns those samples. So the frame the policy sees before action ``t`` shows the scene one or two
substeps into action ``t - 1``, not the recorded state ``states[t]`` (the state before action ``t``, after all 25
substeps): measured on a libero_spatial demo, rendering ``states[t]`` itself differs from the recorded frame in
4 % of the agentview and 36-46 % of the wrist-camera pixels (up to 157 levels) while the arm moves.

:func:`replay_observations` therefore runs robosuite's own substep loop for each recorded step, from the recorded
state before it, with the action that was executed, but steps the physics only until the observables have taken
their sample for the period (one or two substeps) and for the rest only advances their timers and the gripper's
command state (its PandaGripper integrates the command at every substep; the arm's torques no longer matter). The 10 settle steps run for real from the
scene's init state and must land exactly on ``states[0]``, which checks the scene and fixtures. What can still
differ from the recording is the solver's warm start of the one re-run substep (it is not part of the flattened
state): the test compares the frames with a rendered recording.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from rsd.errors import ConfigError, ShapeError
from rsd.sim import protocol

__all__ = ["replay_observations"]


def _camera_observables(inner: Any) -> list[Any]:
    names = [n for n in inner._observables if n.endswith("_image")]
    if not names:
        raise ConfigError("replay_observations needs a rendered env (make_env(..., render=True)): it has no cameras.")
    return [inner._observables[n] for n in names]


def _advance_grippers(inner: Any, action: np.ndarray) -> None:
    """What ``Robot.control`` does to the gripper's own state in one substep: ``format_action`` (PandaGripper
    integrates its command there); the ctrl values it writes are the next state's business."""
    cutoff = 0
    for robot in inner.robots:
        part = action[cutoff:cutoff + robot.action_dim]
        if robot.has_gripper:
            robot.gripper.format_action(part[robot.controller.control_dim:])
        cutoff += robot.action_dim


def replay_observations(env: Any, scene_state: np.ndarray, fixtures: dict[str, Any] | None, states: np.ndarray,
                        executed_actions: np.ndarray) -> Iterator[dict[str, Any]]:
    """Yield the observation before each recorded action ``t`` (``make_observation`` of it: ``full_image``,
    ``wrist_image`` as ``rsd eval`` makes them), for a demo recorded by ``rsd collect``: its scene
    (``rsd_scene_init_state`` and the scene's fixture poses), ``states`` [T, S] and the actions the env executed
    [T, 7] (``obs/executed_actions`` of a DART demo, else ``actions``). ConfigError when the settle steps do not
    reproduce ``states[0]`` (another scene, fixtures or simulator version)."""
    from rsd.sim.libero import make_observation

    states = np.asarray(states, dtype=np.float64)
    actions = np.asarray(executed_actions, dtype=np.float64)
    if states.ndim != 2 or actions.shape != (len(states), protocol.ACTION_DIM):
        raise ShapeError(f"need states [T, S] and executed actions [T, {protocol.ACTION_DIM}] with one T, got "
                         f"{list(states.shape)} and {list(actions.shape)}.")
    obs = env.reset_to_state(scene_state, fixtures)
    for _ in range(protocol.NUM_STEPS_WAIT):
        obs, _ = env.step(protocol.dummy_action())
    settled = np.asarray(env.raw_env.get_sim_state(), dtype=np.float64)
    if not np.array_equal(settled, states[0]):
        raise ConfigError(f"the settle steps from the demo's scene reach another state than its states[0] (max "
                          f"difference {np.max(np.abs(settled - states[0])):.3g}): wrong fixture poses, or the "
                          f"simulator changed since the recording.")
    yield obs
    inner = env.raw_env.env  # the robosuite env: its substep loop is re-run below
    cameras = _camera_observables(inner)
    substeps = int(round(inner.control_timestep / inner.model_timestep))
    for t in range(1, len(states)):
        inner.sim.set_state_from_flattened(states[t - 1])
        inner.sim.forward()
        before = [c._current_observed_value for c in cameras]
        stepping = True
        for i in range(substeps):  # robosuite.environments.base.MujocoEnv.step's loop
            if stepping:
                inner.sim.forward()
                inner._pre_action(actions[t - 1], policy_step=i == 0)  # arm controller's goal + torques, gripper
                inner.sim.step()
            else:  # the arm's torques no longer matter; the gripper's command still integrates at every substep
                _advance_grippers(inner, actions[t - 1])
            inner._update_observables()
            if stepping and all(c._current_observed_value is not b for c, b in zip(cameras, before)):
                stepping = False  # sampled: the rest of the step only advances timers and the gripper command
        if stepping:
            raise ConfigError(f"step {t}: the cameras took no sample during a control step; robosuite's observable "
                              f"timing is not the one this replay mirrors.")
        yield make_observation(inner._get_observations(), with_images=True)

"""The observations a recorded episode saw, re-created by re-running it: its scene, the protocol's settle steps, then
the actions the env executed, in a rendered env.

Why re-run rather than show the env each recorded state: what robosuite hands a policy after a control step is not
the state at the end of that step. A control step is 25 physics substeps (20 Hz control, 2 ms substeps), and every
observable (cameras and proprio) is *sampled* at the first substep of its 50 ms period
(``robosuite.utils.observables.Observable.update``). The frame a policy sees before action ``t`` shows the scene one
substep into action ``t - 1``, not ``states[t]``: measured on a libero_spatial demo, rendering ``states[t]`` itself
differs from the recorded frame in 1-10 % of the agentview and 2-46 % of the wrist-camera pixels (up to 157 levels;
six steps sampled). Re-running the episode reproduces that timing by construction, and needs only what every
``rsd collect`` demo keeps: the scene (``rsd_scene_init_state`` and its fixture poses), the executed actions, and
the recorded proprio to check against.

The simulator is deterministic given the scene and the actions, so the re-run must meet the recording: at every
step the sampled proprio (end-effector position and axis-angle, gripper joints) must equal the demo's recorded
``ee_pos`` / ``ee_ori`` / ``gripper_states`` to within ``PROPRIO_ATOL`` (bit for bit on the recording machine; other
CPUs round differently), or :func:`replay_observations` raises :class:`ReplayMismatchError` (another scene, wrong
fixture poses, another simulator version).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from rsd.errors import ReplayMismatchError, ShapeError
from rsd.sim import protocol
from rsd.sim.episode import settle

__all__ = ["replay_observations", "PROPRIO_ATOL"]


PROPRIO_ATOL = 5e-3  # m / rad. Same machine: 0. Another CPU: its floating point differs by ~1e-16 at first, and
# contacts grow that (at most 1.87e-5 m over libero_spatial's 500 clean demos on the GPU machine): the re-run is then a
# nearby trajectory, checked to stay within 5 mm; each demo's largest deviation is reported and kept in the views file.


def _proprio(raw: dict[str, Any]) -> np.ndarray:
    """The recorded proprio of one step, as ``rsd collect`` stores it (ee_pos 3, ee_ori 3, gripper_states 2)."""
    return np.concatenate([np.asarray(raw["robot0_eef_pos"], np.float64), protocol.quat2axisangle(raw["robot0_eef_quat"]),
                           np.asarray(raw["robot0_gripper_qpos"], np.float64)])


def replay_observations(env: Any, scene_state: np.ndarray, fixtures: dict[str, Any] | None,
                        executed_actions: np.ndarray, recorded_proprio: np.ndarray,
                        deviation: list[float] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the observation before each recorded action ``t`` (``make_observation``: ``full_image``,
    ``wrist_image`` as ``rsd eval`` makes them) of a demo recorded by ``rsd collect``: from its scene, the actions
    the env executed [T, 7] (``obs/executed_actions`` of a DART demo, else ``actions``) and the recorded proprio
    [T, 8] (``ee_pos``, ``ee_ori``, ``gripper_states``) that every re-run step must meet within ``PROPRIO_ATOL``
    (:class:`ReplayMismatchError` otherwise). ``env`` is a rendered ``LiberoEnv`` of the demo's task.
    ``deviation``: a one-element list that receives the largest proprio deviation seen so far."""
    deviation = [0.0] if deviation is None else deviation
    actions = np.asarray(executed_actions, dtype=np.float64)
    proprio = np.asarray(recorded_proprio, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != protocol.ACTION_DIM or proprio.shape != (len(actions), 8):
        raise ShapeError(f"need executed actions [T, {protocol.ACTION_DIM}] and recorded proprio [T, 8] with one T, "
                         f"got {list(actions.shape)} and {list(proprio.shape)}.")
    env.reset_to_state(scene_state, fixtures)
    obs = settle(env)  # the settle steps as an episode takes them
    for t in range(len(actions)):
        seen = _proprio(env.raw_obs)
        deviation[0] = max(deviation[0], float(np.max(np.abs(seen - proprio[t]))))
        if deviation[0] > PROPRIO_ATOL:
            raise ReplayMismatchError(
                f"step {t} of {len(actions)}: the re-run's proprio differs from the recording by up to "
                f"{deviation[0]:.3g} (over {PROPRIO_ATOL}: another scene, wrong fixture poses, or a simulator that "
                f"changed since the recording).")
        yield obs
        if t + 1 < len(actions):
            obs, _ = env.step(actions[t])

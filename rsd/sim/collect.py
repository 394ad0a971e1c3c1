"""Record successful episodes of a policy to HDF5 in LIBERO's demonstration layout (the simulation behind
``rsd collect``, whose options live in ``rsd.collect``).

Episodes run under the evaluation protocol (``rsd.sim.episode.run_episode``: seed, 10 settle steps, open-loop
chunks, success = ``done``); for each task, init states 0, 1, 2, ... are tried in order until
``episodes_per_task`` successes are recorded. Only successful episodes are written; each step stores the
observation *before* its action, the action and the flattened MuJoCo state (layout: ``rsd.sim.demos``).
An error inside an episode stops the recording (the partial file is deleted) and is raised. One writer per
file: a second writer of the same file is refused, naming the first (``DemoWriter``'s lock); the file appears,
complete and fsynced, only at the end (written as ``<out>.partial``, then renamed).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from rsd.errors import ConfigError
from rsd.observation import RAW
from rsd.sim import protocol

__all__ = ["collect"]


class _Recorder:
    """``on_step(obs, action)`` callback of ``run_episode``: buffers one episode's steps."""

    def __init__(self, env: Any, images: bool) -> None:
        self.env, self.images = env, images
        self.clear()

    def clear(self) -> None:
        self.actions: list[np.ndarray] = []
        self.states: list[np.ndarray] = []
        self.robot_states: list[np.ndarray] = []
        self.obs: dict[str, list[np.ndarray]] = {k: [] for k in (
            "ee_pos", "ee_ori", "ee_states", "gripper_states", "joint_states",
            *(("agentview_rgb", "eye_in_hand_rgb") if self.images else ()))}

    def __call__(self, obs: dict[str, Any], action: np.ndarray) -> None:
        raw = obs[RAW]
        ee_pos = np.array(raw["robot0_eef_pos"], dtype=np.float64)
        ee_ori = protocol.quat2axisangle(raw["robot0_eef_quat"])
        gripper = np.array(raw["robot0_gripper_qpos"], dtype=np.float64)
        self.obs["ee_pos"].append(ee_pos)
        self.obs["ee_ori"].append(ee_ori)
        self.obs["ee_states"].append(np.concatenate([ee_pos, ee_ori]))
        self.obs["gripper_states"].append(gripper)
        self.obs["joint_states"].append(np.array(raw["robot0_joint_pos"], dtype=np.float64))
        if self.images:
            self.obs["agentview_rgb"].append(np.array(raw[protocol.AGENTVIEW_KEY], dtype=np.uint8))
            self.obs["eye_in_hand_rgb"].append(np.array(raw[protocol.WRIST_KEY], dtype=np.uint8))
        self.robot_states.append(np.concatenate([gripper, ee_pos, np.asarray(raw["robot0_eef_quat"], np.float64)]))
        self.states.append(np.array(self.env.raw_env.get_sim_state(), dtype=np.float64))
        self.actions.append(np.array(action, dtype=np.float64))

    def arrays(self) -> dict[str, Any]:
        return {"actions": np.stack(self.actions), "states": np.stack(self.states),
                "robot_states": np.stack(self.robot_states),
                "obs": {k: np.stack(v) for k, v in self.obs.items()}}


def collect(suite: str, task_ids: list[int], episodes_per_task: int, out: Path, *, policy: Any, policy_spec: str,
            render: bool = False, camera_size: int = protocol.CAMERA_SIZE, seed: int = protocol.SEED,
            command: str = "", progress: bool = True) -> dict[int, dict[str, Any]]:
    """Record ``episodes_per_task`` successful episodes of every task in ``task_ids`` into ``out``.

    Returns per-task counts ``{task_id: {"recorded", "attempts", "failed_init_states", "steps"}}``.
    """
    from tqdm import tqdm

    from rsd.limits import check_seed
    from rsd.sim.demos import DemoWriter
    from rsd.sim.episode import run_episode
    from rsd.sim.libero import make_env

    if episodes_per_task < 1:
        raise ConfigError(f"--episodes-per-task must be >= 1, got {episodes_per_task}.")
    check_seed(seed)
    report: dict[int, dict[str, Any]] = {}
    max_steps = protocol.max_steps_for(suite)
    import robosuite.macros as macros  # LIBERO depends on robosuite: its image convention goes into the file

    file_attrs = {"macros_image_convention": macros.IMAGE_CONVENTION, "rsd_suite": suite, "rsd_policy": policy_spec,
                  "rsd_seed": seed, "rsd_command": command, "rsd_render": render,
                  "rsd_num_steps_wait": protocol.NUM_STEPS_WAIT,
                  **({"rsd_camera_size": camera_size} if render else {})}
    bar = tqdm(total=episodes_per_task * len(task_ids), unit="demo", desc="rsd collect", disable=not progress,
               file=sys.stderr)
    with DemoWriter(out, file_attrs=file_attrs) as writer:
        for tid in task_ids:
            with make_env(suite, tid, render=render, camera_size=camera_size) as env:
                task = env.task
                problem_info = {"problem_name": env.raw_env.problem_name, "domain_name": env.raw_env.domain_name,
                                "language_instruction": task.instruction}
                recorder = _Recorder(env, images=render)
                entry = {"recorded": 0, "attempts": 0, "failed_init_states": [], "steps": []}
                for index in range(env.num_init_states):
                    if entry["recorded"] == episodes_per_task:
                        break
                    recorder.clear()
                    outcome = run_episode(env, policy, task.instruction, index, max_steps, seed=seed,
                                          on_step=recorder)
                    entry["attempts"] += 1
                    if outcome.exception is not None:  # loud: the partial file is deleted
                        exc = outcome.exception
                        exc.add_note(f"while recording {suite} task {tid} from init state {index}")
                        raise exc
                    if not outcome.success:
                        entry["failed_init_states"].append(index)
                        continue
                    data = recorder.arrays()
                    writer.add(actions=data["actions"], obs=data["obs"], states=data["states"],
                               robot_states=data["robot_states"], problem_info=problem_info,
                               attrs={"rsd_suite": suite, "rsd_task_id": tid, "rsd_task_name": task.name,
                                      "rsd_init_state_index": index})
                    entry["recorded"] += 1
                    entry["steps"].append(outcome.steps)
                    bar.update(1)
                report[tid] = entry
                bar.write(f"task {tid}: {entry['recorded']}/{episodes_per_task} recorded in {entry['attempts']} "
                          f"attempts (failed init states {entry['failed_init_states']})", file=sys.stderr)
    bar.close()
    return report

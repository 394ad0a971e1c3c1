"""Record successful demonstrations from fresh randomized scenes to HDF5 in LIBERO's demonstration layout (the
simulation behind ``rsd collect``, whose options live in ``rsd.collect``).

Scenes: never the benchmark's 50 init states per task, which stay reserved for evaluation. Attempt k of a task
starts from the fresh scene of seed ``scene_seed_start + k`` (``LiberoEnv.reset_scene``: LIBERO's own object
placement under that seed); a scene equal to one of the task's benchmark init states (every MuJoCo state value
within ``SCENE_MATCH_TOL``) is skipped and counted. Seeds below ``protocol.NUM_TRIALS_PER_TASK`` are refused, so
a demo's seed is never read as a trial index. Each demo records its seed and its scene's init state.

Episodes otherwise run as the evaluation runs them (``rsd.sim.episode.run_episode``: seed, 10 settle steps, the
suite's step budget, success = ``done``); a policy returning one-action chunks (``StepwiseExpert``: ``rsd
collect --policy expert``) is asked for every step. Only successful episodes are written, up to
``episodes_per_task`` per task, trying at most ``max_attempts_per_task`` scenes. Each step stores the observation
*before* its action (proprio, every object's pose, both camera views when rendered), the action and the flattened
MuJoCo state (layout: ``rsd.sim.demos``). An error inside an episode stops the recording (the partial file is
deleted) and is raised. One writer per file (``DemoWriter``'s lock); the file appears, complete and fsynced,
only at the end (written as ``<out>.partial``, then renamed).
"""

from __future__ import annotations

import json
import sys
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from rsd.errors import ConfigError
from rsd.observation import RAW
from rsd.sim import protocol
from rsd.sim.protocol import object_names

__all__ = ["collect", "object_names", "benchmark_match", "SCENE_SEED_START", "SCENE_MATCH_TOL"]

SCENE_SEED_START = 1000  # default first scene seed (any seed >= protocol.NUM_TRIALS_PER_TASK is allowed)
SCENE_MATCH_TOL = 1e-3  # [m, rad, m/s] a scene this close to a benchmark init state in every state value is it


def benchmark_match(state: np.ndarray, init_states: np.ndarray, tol: float = SCENE_MATCH_TOL) -> int | None:
    """Index of the benchmark init state ``state`` [S] equals within ``tol`` in every value, or None."""
    diff = np.max(np.abs(np.asarray(init_states) - np.asarray(state)[None, :]), axis=1)  # [N]
    hits = np.flatnonzero(diff <= tol)
    return int(hits[0]) if hits.size else None


class _Recorder:
    """``on_step(obs, action)`` callback of ``run_episode``: buffers one episode's steps."""

    def __init__(self, env: Any, images: bool) -> None:
        self.env, self.images = env, images
        self.objects: list[str] | None = None
        self.clear()

    def clear(self) -> None:
        self.actions: list[np.ndarray] = []
        self.states: list[np.ndarray] = []
        self.robot_states: list[np.ndarray] = []
        self.obs: dict[str, list[np.ndarray]] = {k: [] for k in (
            "ee_pos", "ee_ori", "ee_states", "gripper_states", "joint_states",
            *(("agentview_rgb", "eye_in_hand_rgb") if self.images else ()))}

    labels: "ExecutionNoise | None" = None  # set when the executed actions are perturbed (rsd collect --action-noise)

    def __call__(self, obs: dict[str, Any], action: np.ndarray) -> None:
        raw = obs[RAW]
        if self.objects is None:  # one task env: the same objects in every episode
            self.objects = object_names(raw)
        ee_pos = np.array(raw["robot0_eef_pos"], dtype=np.float64)
        ee_ori = protocol.quat2axisangle(raw["robot0_eef_quat"])
        gripper = np.array(raw["robot0_gripper_qpos"], dtype=np.float64)
        self.obs["ee_pos"].append(ee_pos)
        self.obs["ee_ori"].append(ee_ori)
        self.obs["ee_states"].append(np.concatenate([ee_pos, ee_ori]))
        self.obs["gripper_states"].append(gripper)
        self.obs["joint_states"].append(np.array(raw["robot0_joint_pos"], dtype=np.float64))
        for name in self.objects:
            for part in ("pos", "quat"):
                key = f"{name}_{part}"
                self.obs.setdefault(key, []).append(np.array(raw[key], dtype=np.float64))
        if self.images:
            self.obs["agentview_rgb"].append(np.array(raw[protocol.AGENTVIEW_KEY], dtype=np.uint8))
            self.obs["eye_in_hand_rgb"].append(np.array(raw[protocol.WRIST_KEY], dtype=np.uint8))
        self.robot_states.append(np.concatenate([gripper, ee_pos, np.asarray(raw["robot0_eef_quat"], np.float64)]))
        self.states.append(np.array(self.env.raw_env.get_sim_state(), dtype=np.float64))
        if self.labels is not None:  # the expert's own action is the label; what ran is kept beside it
            self.obs.setdefault("executed_actions", []).append(np.array(action, dtype=np.float64))
            action = self.labels.label_for_step()
        self.actions.append(np.array(action, dtype=np.float64))

    def arrays(self) -> dict[str, Any]:
        return {"actions": np.stack(self.actions), "states": np.stack(self.states),
                "robot_states": np.stack(self.robot_states),
                "obs": {k: np.stack(v) for k, v in self.obs.items()}}


class ExecutionNoise:
    """DART-style demonstrations (Laskey et al., 2017): the env executes the expert's action plus noise, the demo
    records the expert's own action as the label (and ``obs/executed_actions``). The expert, a closed-loop
    controller, corrects the drift at the next steps, so the demos show how to recover from states a learned
    policy's own errors lead to, which noise-free demos never visit.

    Noise on the translation dims only (0-2, env units, clipped to [-1, 1]), AR(1) in time:
    ``n_t = rho n_{t-1} + sqrt(1 - rho^2) sigma e_t`` (``rho = 0.9``: it drifts for ~10 steps, like a chunk's
    error, instead of averaging away at 20 Hz); seeded per episode (``begin``)."""

    RHO = 0.9
    DIMS = slice(0, 3)

    def __init__(self, policy: Any, sigma: float) -> None:
        if not (isinstance(sigma, (int, float)) and 0.0 < sigma <= 1.0):
            raise ConfigError(f"--action-noise must be in (0, 1] (std of the executed translation noise), got {sigma!r}.")
        self.policy, self.sigma = policy, float(sigma)
        self._rng = np.random.default_rng(0)
        self._noise = np.zeros(3)
        self._labels: deque[np.ndarray] = deque()

    def begin(self, *seed: int) -> None:
        self._rng = np.random.default_rng(list(seed))
        self._noise = np.zeros(3)
        self._labels = deque()

    def reset(self) -> None:
        self.policy.reset()

    def predict_chunk(self, observation: Any, instruction: str) -> Any:
        from rsd.policy.protocol import ActionChunk

        chunk = self.policy.predict_chunk(observation, instruction)
        clean = np.asarray(chunk.actions, dtype=np.float64)
        executed = clean.copy()
        for row in executed:
            self._noise = self.RHO * self._noise + np.sqrt(1 - self.RHO ** 2) * self.sigma * self._rng.normal(size=3)
            row[self.DIMS] = np.clip(row[self.DIMS] + self._noise, -1.0, 1.0)
        self._labels.extend(clean)
        return ActionChunk(actions=executed.astype(np.float32), info=chunk.info)

    def label_for_step(self) -> np.ndarray:
        return self._labels.popleft()


class _FreshScenes:
    """The episode loop's env over a ``LiberoEnv`` whose ``reset`` starts the fresh scene of a seed: the
    ``init_state_index`` that ``run_episode`` passes on is a scene seed here."""

    def __init__(self, env: Any) -> None:
        self.env = env

    def reset(self, scene_seed: int) -> dict[str, Any]:
        return self.env.reset_scene(scene_seed)

    def step(self, action: np.ndarray, *, images: bool = True) -> tuple[dict[str, Any], bool]:
        return self.env.step(action, images=images)

    def frame(self) -> np.ndarray:
        return self.env.frame()


def collect(suite: str, task_ids: list[int], episodes_per_task: int, out: Path, *, policy: Any, policy_spec: str,
            render: bool = False, camera_size: int = protocol.CAMERA_SIZE, seed: int = protocol.SEED,
            scene_seed_start: int = SCENE_SEED_START, max_attempts_per_task: int | None = None, command: str = "",
            progress: bool = True, action_noise: float = 0.0) -> dict[int, dict[str, Any]]:
    """Record ``episodes_per_task`` successful episodes of every task in ``task_ids`` into ``out``.

    ``action_noise`` > 0 records DART-style demos (:class:`ExecutionNoise`).
    Returns per-task counts ``{task_id: {"recorded", "attempts", "failed_seeds", "benchmark_seeds", "seeds",
    "steps"}}`` (``seeds``: those recorded; ``benchmark_seeds``: skipped, their scene was a benchmark init state).
    """
    from tqdm import tqdm

    from rsd.limits import SEED_MAX, check_seed
    from rsd.sim.demos import DemoWriter
    from rsd.sim.episode import run_episode
    from rsd.sim.libero import make_env

    if episodes_per_task < 1:
        raise ConfigError(f"--episodes-per-task must be >= 1, got {episodes_per_task}.")
    check_seed(seed)
    if not isinstance(scene_seed_start, int) or scene_seed_start < protocol.NUM_TRIALS_PER_TASK:
        raise ConfigError(f"--scene-seed-start must be an int >= {protocol.NUM_TRIALS_PER_TASK} (seeds stay apart "
                          f"from the benchmark's init state indices 0-{protocol.NUM_TRIALS_PER_TASK - 1}), got "
                          f"{scene_seed_start!r}.")
    max_attempts = 2 * episodes_per_task + 10 if max_attempts_per_task is None else max_attempts_per_task
    if max_attempts < episodes_per_task:
        raise ConfigError(f"--max-attempts-per-task ({max_attempts}) must be >= --episodes-per-task "
                          f"({episodes_per_task}).")
    if scene_seed_start + max_attempts - 1 > SEED_MAX:
        raise ConfigError(f"scene seeds {scene_seed_start}..{scene_seed_start + max_attempts - 1} pass numpy's "
                          f"seed range (<= {SEED_MAX}): lower --scene-seed-start.")
    report: dict[int, dict[str, Any]] = {}
    max_steps = protocol.max_steps_for(suite)
    import robosuite.macros as macros  # LIBERO depends on robosuite: its image convention goes into the file

    file_attrs = {"macros_image_convention": macros.IMAGE_CONVENTION, "rsd_suite": suite, "rsd_policy": policy_spec,
                  "rsd_seed": seed, "rsd_command": command, "rsd_render": render,
                  "rsd_num_steps_wait": protocol.NUM_STEPS_WAIT, "rsd_scenes": "fresh",
                  "rsd_scene_seed_start": scene_seed_start, "rsd_action_noise": float(action_noise),
                  **({"rsd_camera_size": camera_size} if render else {})}
    noise = ExecutionNoise(policy, action_noise) if action_noise else None
    actor = noise or policy
    bar = tqdm(total=episodes_per_task * len(task_ids), unit="demo", desc="rsd collect", disable=not progress,
               file=sys.stderr)
    with DemoWriter(out, file_attrs=file_attrs) as writer:
        for tid in task_ids:
            with make_env(suite, tid, render=render, camera_size=camera_size) as env:
                task = env.task
                problem_info = {"problem_name": env.raw_env.problem_name, "domain_name": env.raw_env.domain_name,
                                "language_instruction": task.instruction}
                recorder = _Recorder(env, images=render)
                recorder.labels = noise
                scenes = _FreshScenes(env)
                entry: dict[str, Any] = {"recorded": 0, "attempts": 0, "failed_seeds": [], "benchmark_seeds": [],
                                         "seeds": [], "steps": []}
                for scene_seed in range(scene_seed_start, scene_seed_start + max_attempts):
                    if entry["recorded"] == episodes_per_task:
                        break
                    recorder.clear()
                    if noise is not None:
                        noise.begin(seed, tid, scene_seed)
                    outcome = run_episode(scenes, actor, task.instruction, scene_seed, max_steps, seed=seed,
                                          on_step=recorder)
                    entry["attempts"] += 1
                    if outcome.exception is not None:  # loud: the partial file is deleted
                        exc = outcome.exception
                        exc.add_note(f"while recording {suite} task {tid} from scene seed {scene_seed}")
                        raise exc
                    scene = env.scene_state
                    if benchmark_match(scene, env.init_states) is not None:
                        entry["benchmark_seeds"].append(scene_seed)
                        continue
                    if not outcome.success:
                        entry["failed_seeds"].append(scene_seed)
                        bar.set_postfix(task=tid, failed=len(entry["failed_seeds"]))
                        continue
                    data = recorder.arrays()
                    writer.add(actions=data["actions"], obs=data["obs"], states=data["states"],
                               robot_states=data["robot_states"], problem_info=problem_info,
                               attrs={"rsd_suite": suite, "rsd_task_id": tid, "rsd_task_name": task.name,
                                      "rsd_scene_seed": scene_seed, "rsd_scene_init_state": scene,
                                      "rsd_objects": json.dumps(recorder.objects)})
                    entry["recorded"] += 1
                    entry["seeds"].append(scene_seed)
                    entry["steps"].append(outcome.steps)
                    bar.update(1)
                report[tid] = entry
                bar.write(f"task {tid}: {entry['recorded']}/{episodes_per_task} recorded in {entry['attempts']} "
                          f"scenes (failed seeds {entry['failed_seeds']}"
                          + (f", benchmark scenes skipped {entry['benchmark_seeds']})" if entry["benchmark_seeds"]
                             else ")"), file=sys.stderr)
    bar.close()
    return report

"""Record successful episodes of a policy (the scripted expert) to HDF5 in LIBERO's demonstration layout.

Episodes run under the evaluation protocol (``rsd.eval.run_episode``: seed, 10 settle steps, open-loop
chunks, success = ``done``); for each task, init states 0, 1, 2, ... are tried in order until
``--episodes-per-task`` successes are recorded. Only successful episodes are written; each step stores the
observation *before* its action, the action and the flattened MuJoCo state (layout: ``rsd.sim.demos``).
An error inside an episode stops the recording (the partial file is deleted) and is raised. One writer per
``--out``: a second ``rsd collect`` of the same file is refused, naming the first (``DemoWriter``'s lock); the
file appears, complete and fsynced, only at the end (written as ``<out>.partial``, then renamed).

    rsd collect --suite libero_spatial --policy expert --episodes-per-task 20 --out runs/demos/spatial.hdf5
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rsd.errors import ConfigError
from rsd.sim import protocol

__all__ = ["HELP", "add_arguments", "run", "collect"]

HELP = "record scripted-expert episodes to HDF5 (LIBERO demo layout)"


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
        raw = obs["raw"]
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

    from rsd.eval import run_episode
    from rsd.limits import check_seed
    from rsd.sim.demos import DemoWriter
    from rsd.sim.libero import make_env

    if episodes_per_task < 1:
        raise ConfigError(f"--episodes-per-task must be >= 1, got {episodes_per_task}.")
    check_seed(seed)
    report: dict[int, dict[str, Any]] = {}
    max_steps = protocol.max_steps_for(suite)
    import robosuite.macros as macros  # LIBERO depends on robosuite: its image convention goes into the file

    file_attrs = {"macros_image_convention": macros.IMAGE_CONVENTION, "rsd_suite": suite, "rsd_policy": policy_spec, "rsd_seed": seed, "rsd_command": command,
                  "rsd_render": render, "rsd_num_steps_wait": protocol.NUM_STEPS_WAIT,
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="libero_spatial", choices=protocol.SUITES)
    parser.add_argument("--policy", default="expert", help="policy name or directory (default: expert)")
    parser.add_argument("--episodes-per-task", type=int, required=True,
                        help="successful episodes to record per task (init states 0, 1, ... tried in order)")
    parser.add_argument("--tasks", default=None, help="task ids, e.g. '0,3' or '0-4' (default: all)")
    parser.add_argument("--render", action="store_true",
                        help="also record agentview_rgb / eye_in_hand_rgb (about 10x slower)")
    parser.add_argument("--camera-size", type=int, default=128,
                        help="image size when rendering (LIBERO's own demo files use 128)")
    parser.add_argument("--seed", type=int, default=protocol.SEED)
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write (must not exist)")
    parser.add_argument("--device", default=None, help="device of learned policies (default: cuda if available)")
    parser.add_argument("--fast", action="store_true",
                        help="learned policies on rsd's CUDA fast path, as `rsd eval --fast` (CUDA only; refused for "
                             "scripted policies)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a saved policy's backbone run its checkpoint's own Python code when its "
                             "policy.json asks for it (refused without this flag)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rsd.eval import parse_task_ids
    from rsd.limits import check_seed
    from rsd.policy.factory import check_device, check_fast, make_policy

    if args.fast:  # before LIBERO is touched or anything is written
        check_fast(args.policy, args.device)
    check_device(args.device)
    check_seed(args.seed)
    if args.episodes_per_task < 1:
        raise ConfigError(f"--episodes-per-task must be >= 1, got {args.episodes_per_task}.")
    from rsd.sim.libero import list_tasks

    n_tasks = len(list_tasks(args.suite))
    tasks = parse_task_ids(args.tasks)
    task_ids = list(range(n_tasks)) if tasks is None else list(tasks)
    bad = [t for t in task_ids if not 0 <= t < n_tasks]
    if bad:
        raise ConfigError(f"--tasks {bad} out of range: {args.suite} has tasks 0-{n_tasks - 1}.")
    if args.out.exists():
        raise ConfigError(f"{args.out} exists; choose another --out or delete it first.")
    t0 = time.perf_counter()
    report = collect(args.suite, task_ids, args.episodes_per_task, args.out,
                     policy=make_policy(args.policy, suite=args.suite, device=args.device, fast=args.fast,
                                        trust_remote_code=args.trust_remote_code),
                     policy_spec=args.policy, render=args.render, camera_size=args.camera_size, seed=args.seed,
                     command=shlex.join(["rsd", *sys.argv[1:]]), progress=not args.no_progress)
    wall = time.perf_counter() - t0
    short = []
    print(f"{'task':>4}  {'recorded':>8}  {'attempts':>8}  {'mean steps':>10}  failed init states")
    for tid, e in report.items():
        mean = f"{np.mean(e['steps']):.1f}" if e["steps"] else "-"
        print(f"{tid:>4}  {e['recorded']:>8}  {e['attempts']:>8}  {mean:>10}  {e['failed_init_states']}")
        if e["recorded"] < args.episodes_per_task:
            short.append(tid)
    total = sum(e["recorded"] for e in report.values())
    print(f"wrote {total} demos to {args.out} in {wall:.0f} s")
    if short:
        print(f"rsd collect: tasks {short} ran out of init states before {args.episodes_per_task} successes "
              f"(the file holds what succeeded).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    from rsd.cli import main

    sys.exit(main(["collect", *sys.argv[1:]]))

"""``rsd collect``: record demonstrations of a policy (by default the scripted expert, deciding a fresh action at
every control step) to HDF5 in LIBERO's demonstration layout, with their normalization statistics beside them
(the recording itself: ``rsd.sim.collect``).

Scenes: fresh randomized ones, never the benchmark's 50 init states per task (those stay reserved for `rsd eval`).
Attempt k of every task starts from LIBERO's own random object placement under scene seed
``--scene-seed-start + k`` (default 1000; seeds below 50 are refused); a scene equal to one of the task's benchmark
init states is skipped. Each episode then runs as `rsd eval` runs one (seed, 10 settle steps with the dummy
action, the suite's step budget, success = LIBERO's done flag). Seeds are tried in order until
``--episodes-per-task`` successes are recorded or ``--max-attempts-per-task`` scenes were tried.

Policy: ``expert`` is the scripted privileged expert queried at every step (20 Hz, closed loop: within-chunk
motion is real, chunks cut from the demos are never one action tiled); any other ``--policy`` runs its chunks
open loop, as `rsd eval` does.

The HDF5 file (``--out``; layout: ``rsd.sim.demos``) holds only successful episodes, as ``data/demo_<i>`` with
``actions`` [T, 7] (env convention, gripper -1 open / +1 close), ``states`` [T, S] (flattened MuJoCo state before
each action), ``robot_states``, ``rewards``, ``dones`` and ``obs/``: proprio (``ee_pos``, ``ee_ori``,
``ee_states``, ``gripper_states``, ``joint_states``), the pose of every object in the scene (``<object>_pos``
[T, 3], ``<object>_quat`` [T, 4], xyzw) and, with ``--render``, both camera views (``agentview_rgb``,
``eye_in_hand_rgb``, raw, uint8). Each demo's attributes name its task, its scene seed (``rsd_scene_seed``) and
its scene's init state (``rsd_scene_init_state``, before the settle steps; ``init_state`` is the state at the
first recorded step, as in LIBERO's files).

Statistics: ``<out stem>_dataset_statistics.json`` beside ``--out``, in OpenVLA's ``dataset_statistics.json``
shape under the key ``<suite>_no_noops``: q01 / q99 / mean / std / min / max of every action dim (gripper in
model convention, mask false: not normalized) and of the 8-d proprio, with num_transitions and num_trajectories;
no-op steps (no arm motion, gripper unchanged) are left out of them, as from OpenVLA's ``*_no_noops`` data
(``rsd.dataset_stats``; read with ``rsd.normalize.load_dataset_statistics``, as OpenVLA-OFT's own files are).

An error inside an episode stops the recording (the partial file is deleted) and is raised. One writer per
``--out``: a second ``rsd collect`` of the same file is refused, naming the first (``DemoWriter``'s lock); the
file appears, complete and fsynced, only at the end (written as ``<out>.partial``, then renamed). A progress bar
counts recorded demos (``--no-progress`` turns it off).

    rsd collect --suite libero_spatial --episodes-per-task 50 --out runs/demos/libero_spatial.hdf5
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rsd.dataset_stats import statistics_path, write_dataset_statistics
from rsd.errors import ConfigError
from rsd.sim import protocol
from rsd.sim.collect import SCENE_SEED_START, collect

__all__ = ["HELP", "add_arguments", "run"]

HELP = "record per-step expert demos from fresh scenes to HDF5 (LIBERO layout) + dataset_statistics.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="libero_spatial", choices=protocol.SUITES)
    parser.add_argument("--policy", default="expert",
                        help="expert (default: the scripted expert, asked at every step), expert-rfsq[:DIR], "
                             "openvla-oft:PATH or a saved policy directory (their chunks run open loop)")
    parser.add_argument("--episodes-per-task", type=int, required=True,
                        help="successful episodes to record per task (scene seeds tried in order)")
    parser.add_argument("--scene-seed-start", type=int, default=SCENE_SEED_START,
                        help=f"scene seed of each task's first attempt; attempt k uses this + k (default "
                             f"{SCENE_SEED_START}; must be >= {protocol.NUM_TRIALS_PER_TASK})")
    parser.add_argument("--max-attempts-per-task", type=int, default=None,
                        help="scenes tried per task before giving up (default: 2 x episodes-per-task + 10)")
    parser.add_argument("--tasks", default=None, help="task ids, e.g. '0,3' or '0-4' (default: all)")
    parser.add_argument("--render", action="store_true",
                        help="also record agentview_rgb / eye_in_hand_rgb (about 10x slower)")
    parser.add_argument("--camera-size", type=int, default=128,
                        help="image size when rendering (LIBERO's own demo files use 128)")
    parser.add_argument("--seed", type=int, default=protocol.SEED,
                        help="random / numpy / torch seed of every episode, as `rsd eval --seed` (default 7)")
    parser.add_argument("--out", type=Path, required=True,
                        help="HDF5 file to write (must not exist, nor its <stem>_dataset_statistics.json)")
    parser.add_argument("--device", default=None, help="device of learned policies (default: cuda if available)")
    parser.add_argument("--fast", action="store_true",
                        help="learned policies on rsd's CUDA fast path, as `rsd eval --fast` (CUDA only; refused for "
                             "scripted policies)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a saved policy's backbone run its checkpoint's own Python code when its "
                             "policy.json asks for it (refused without this flag)")
    parser.add_argument("--no-center-crop", dest="center_crop", action="store_false",
                        help="openvla-oft:PATH only: feed the model uncropped images (as `rsd eval --no-center-crop`)")
    parser.add_argument("--action-noise", type=float, default=0.0,
                        help="DART-style demos: execute the expert's action plus AR(1) noise of this std on the "
                             "translation dims, record the expert's own action as the label (0: off)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rsd.eval.cli import parse_task_ids
    from rsd.limits import check_seed
    from rsd.policy.factory import check_device, check_fast
    from rsd.policy.identity import model_center_crop

    if args.fast:  # before LIBERO is touched or anything is written
        check_fast(args.policy, args.device)
    check_device(args.device)
    check_seed(args.seed)
    model_center_crop(args.policy, args.center_crop)
    if args.episodes_per_task < 1:
        raise ConfigError(f"--episodes-per-task must be >= 1, got {args.episodes_per_task}.")
    from rsd.sim.libero import list_tasks

    n_tasks = len(list_tasks(args.suite))
    tasks = parse_task_ids(args.tasks)
    task_ids = list(range(n_tasks)) if tasks is None else list(tasks)
    bad = [t for t in task_ids if not 0 <= t < n_tasks]
    if bad:
        raise ConfigError(f"--tasks {bad} out of range: {args.suite} has tasks 0-{n_tasks - 1}.")
    stats_path = statistics_path(args.out)
    for path in (args.out, stats_path):
        if path.exists():
            raise ConfigError(f"{path} exists; choose another --out or delete it first.")
    t0 = time.perf_counter()
    report = collect(args.suite, task_ids, args.episodes_per_task, args.out,
                     policy=_policy(args), policy_spec=args.policy, render=args.render, camera_size=args.camera_size,
                     seed=args.seed, scene_seed_start=args.scene_seed_start,
                     max_attempts_per_task=args.max_attempts_per_task,
                     command=shlex.join(["rsd", *sys.argv[1:]]), progress=not args.no_progress,
                     action_noise=args.action_noise)
    write_dataset_statistics(args.out, args.suite, stats_path)
    wall = time.perf_counter() - t0
    short = []
    print(f"{'task':>4}  {'recorded':>8}  {'attempts':>8}  {'mean steps':>10}  failed scene seeds")
    for tid, e in report.items():
        mean = f"{np.mean(e['steps']):.1f}" if e["steps"] else "-"
        print(f"{tid:>4}  {e['recorded']:>8}  {e['attempts']:>8}  {mean:>10}  {e['failed_seeds']}")
        if e["recorded"] < args.episodes_per_task:
            short.append(tid)
    total = sum(e["recorded"] for e in report.values())
    print(f"wrote {total} demos to {args.out} and their statistics to {stats_path} in {wall:.0f} s")
    if short:
        print(f"rsd collect: tasks {short} used {args.max_attempts_per_task or 'the default number of'} scenes "
              f"before {args.episodes_per_task} successes (the file holds what succeeded); raise "
              f"--max-attempts-per-task.", file=sys.stderr)
        return 1
    return 0


def _policy(args: argparse.Namespace) -> Any:
    """``expert``: the scripted expert asked at every step; anything else through ``rsd.policy.factory``."""
    if args.policy == "expert":
        from rsd.sim.experts import StepwiseExpert

        return StepwiseExpert()
    from rsd.policy.factory import make_policy

    return make_policy(args.policy, suite=args.suite, device=args.device, fast=args.fast,
                       trust_remote_code=args.trust_remote_code, center_crop=args.center_crop)


if __name__ == "__main__":  # pragma: no cover
    from rsd.cli import main

    sys.exit(main(["collect", *sys.argv[1:]]))

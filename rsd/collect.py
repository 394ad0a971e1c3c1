"""``rsd collect``: record successful episodes of a policy (the scripted expert) to HDF5 in LIBERO's demonstration
layout (the recording itself: ``rsd.sim.collect``).

Episodes run under the evaluation protocol (``rsd.sim.episode.run_episode``: seed, 10 settle steps, open-loop
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

import numpy as np

from rsd.errors import ConfigError
from rsd.sim import protocol
from rsd.sim.collect import collect

__all__ = ["HELP", "add_arguments", "run"]

HELP = "record scripted-expert episodes to HDF5 (LIBERO demo layout)"


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
    parser.add_argument("--no-center-crop", dest="center_crop", action="store_false",
                        help="openvla-oft:PATH only: feed the model uncropped images (as `rsd eval --no-center-crop`)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rsd.eval.cli import parse_task_ids
    from rsd.limits import check_seed
    from rsd.policy.factory import check_device, check_fast, make_policy
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
    if args.out.exists():
        raise ConfigError(f"{args.out} exists; choose another --out or delete it first.")
    t0 = time.perf_counter()
    report = collect(args.suite, task_ids, args.episodes_per_task, args.out,
                     policy=make_policy(args.policy, suite=args.suite, device=args.device, fast=args.fast,
                                        trust_remote_code=args.trust_remote_code, center_crop=args.center_crop),
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

"""Run the scripted expert on LIBERO under the OpenVLA-OFT protocol and print its success per task.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/dev_expert.py --suite libero_spatial --task 0 --trials 10
    OMP_NUM_THREADS=1 .venv/bin/python scripts/dev_expert.py --suite libero_object --trials 10   # all 10 tasks
    ... --task 3 --start 7 --trials 1 --verbose                                                  # phase trace

Episodes run through ``rsd.sim.episode.run_episode`` (the protocol loop: ``reset(i)`` for trial i, 10 settle steps
with the dummy action, 8-action chunks until ``done`` from ``env.step`` or the suite's budget, 220 spatial /
280 object). Unrendered (physics only) unless ``--render``. Development tool; ``rsd eval --policy expert`` is
the evaluation command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsd.policy.protocol import ActionChunk  # noqa: E402
from rsd.sim import protocol  # noqa: E402
from rsd.sim.episode import run_episode  # noqa: E402
from rsd.sim.experts import ScriptedExpert  # noqa: E402
from rsd.sim.libero import make_env  # noqa: E402
from rsd.stats import rate_estimate  # noqa: E402


class TracedExpert:
    """The expert, recording each chunk's phase and attempt (and printing a trace when ``verbose``)."""

    def __init__(self, verbose: bool) -> None:
        self.expert = ScriptedExpert()
        self.verbose = verbose
        self.phases: list[str] = []
        self.attempt = 0

    def reset(self) -> None:
        self.expert.reset()
        self.phases = []
        self.attempt = 0

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> ActionChunk:
        chunk = self.expert.predict_chunk(observation, instruction)
        info = chunk.info
        if self.verbose:
            raw = observation["raw"]
            q = raw["robot0_gripper_qpos"]
            print(f"  chunk {len(self.phases):2d} {info['phase']:8s} att {info['attempt']} "
                  f"eef {raw['robot0_eef_pos'].round(3)} obj {raw[info['target'] + '_pos'].round(3)} "
                  f"dest {raw[info['destination'] + '_pos'].round(3)} open {q[0] - q[1]:.4f} "
                  f"a {chunk.actions[0].round(2)}")
        self.phases.append(info["phase"])
        self.attempt = info["attempt"]
        return chunk


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, choices=["libero_spatial", "libero_object"])
    ap.add_argument("--task", type=int, nargs="*", help="task ids (default: all 10)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--start", type=int, default=0, help="first init state index")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    max_steps = protocol.max_steps_for(args.suite)
    tasks = args.task if args.task else list(range(10))
    policy = TracedExpert(args.verbose)
    episode_s: list[float] = []
    rows = []
    for task_id in tasks:
        with make_env(args.suite, task_id, render=args.render) as env:
            wins = 0
            for i in range(args.start, args.start + args.trials):
                t0 = time.perf_counter()
                out = run_episode(env, policy, env.task.instruction, i, max_steps)
                dt = time.perf_counter() - t0
                if out.exception is not None:
                    raise out.exception
                episode_s.append(dt)
                wins += out.success
                print(f"{args.suite}[{task_id}] init {i:2d}: {'OK  ' if out.success else 'FAIL'} "
                      f"steps {out.steps:3d} attempts {policy.attempt} last {policy.phases[-1]:8s} {dt:.1f} s",
                      flush=True)
            rows.append((task_id, args.trials, wins))
    print(f"\n| suite | task | n | successes | rate (95% CI) |\n|---|---|---|---|---|")
    for task_id, n, wins in rows:
        print(f"| {args.suite} | {task_id} | {n} | {wins} | {rate_estimate(wins, n)} |")
    n_all, wins_all = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"pooled: {rate_estimate(wins_all, n_all)}; {sum(episode_s) / max(len(episode_s), 1):.2f} s per episode "
          f"(env.reset + settle + policy steps, {'rendered' if args.render else 'unrendered'}; env creation excluded)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

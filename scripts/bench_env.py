"""Where a LIBERO episode's time goes, in one process: env creation, reset(i), and steps with and without the policy
images, rendered or not; then the same on K processes at once (the per-worker cost when K envs share the host).

    python scripts/bench_env.py --suite libero_spatial --render --resets 3 --steps 40 --processes 1 8 16 --json out.json

Prints the GL vendor/renderer the env's context reports (``rsd info`` probes a separate context) and medians in ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time


def _median_ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 2)


def bench(suite: str, task: int, render: bool, resets: int, steps: int) -> dict:
    import numpy as np

    from rsd.sim import protocol
    from rsd.sim.libero import make_env

    t = time.perf_counter()
    env = make_env(suite, task, render=render, seed=protocol.ENV_SEED)
    created = time.perf_counter() - t
    gl = None
    if render:
        try:
            from rsd.sim.setup import current_gl

            gl = current_gl()
        except Exception as exc:  # noqa: BLE001 - a report, not a check
            gl = {"error": repr(exc)}
    reset_s, step_img, step_noimg = [], [], []
    action = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    for i in range(resets):
        t = time.perf_counter()
        env.reset(i)
        reset_s.append(time.perf_counter() - t)
        for k in range(steps):
            t = time.perf_counter()
            env.step(action, images=k % 2 == 0)
            (step_img if k % 2 == 0 else step_noimg).append(time.perf_counter() - t)
    env.close()
    return {"pid": os.getpid(), "render": render, "gl": gl, "create_ms": round(1e3 * created, 1),
            "reset_ms": _median_ms(reset_s), "step_images_ms": _median_ms(step_img),
            "step_no_images_ms": _median_ms(step_noimg)}


def _one(args: tuple) -> dict:
    return bench(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--task", type=int, default=0)
    p.add_argument("--render", action="store_true")
    p.add_argument("--resets", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--processes", type=int, nargs="+", default=[1])
    p.add_argument("--json", default=None)
    p.add_argument("--profile", type=int, default=0, help="first print cProfile's top N functions of one process")
    a = p.parse_args()
    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(bench, a.suite, a.task, a.render, a.resets, a.steps)
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.profile)
    rows = []
    ctx = mp.get_context("spawn")
    for k in a.processes:
        t = time.perf_counter()
        with ctx.Pool(k) as pool:
            per = pool.map(_one, [(a.suite, a.task, a.render, a.resets, a.steps)] * k)
        row = {"processes": k, "wall_s": round(time.perf_counter() - t, 1), "gl": per[0]["gl"]}
        for key in ("create_ms", "reset_ms", "step_images_ms", "step_no_images_ms"):
            row[key] = statistics.median(r[key] for r in per)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"suite": a.suite, "task": a.task, "render": a.render, "cores": os.cpu_count(), "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()

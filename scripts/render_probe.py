"""Do two machines' renderers give a policy the same pixels? Render fixed scenes here, compare with another's.

    python scripts/render_probe.py --out here.npz                                  # render and save
    python scripts/render_probe.py --out there.npz --compare here.npz \\
        --policy results/pixel/policy_s0/rsd --device cuda                         # render, compare, and the policy

Scenes: libero_object task 0 init state 1 and libero_spatial task 0 init state 0, each after the protocol's reset and
10 settle steps; saved are the policy's two 224 px views (OpenVLA-OFT's preprocessing: rotate, JPEG round trip,
resize), the proprio and the GL vendor/renderer. ``--compare`` prints per view the share of differing values and the
largest and mean absolute difference; ``--policy`` also runs the policy (greedy) on both machines' frames here and
prints how far its actions and its code histograms move: what a renderer difference does to the policy.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

SCENES = (("libero_object", 0, 1), ("libero_spatial", 0, 0))


def render() -> dict[str, np.ndarray]:
    from rsd.observation import FULL_IMAGE, STATE, WRIST_IMAGE
    from rsd.sim import protocol
    from rsd.sim.episode import settle
    from rsd.sim.libero import make_env
    from rsd.sim.setup import current_gl

    out: dict[str, np.ndarray] = {}
    for suite, task, init in SCENES:
        with make_env(suite, task, render=True, seed=protocol.ENV_SEED) as env:
            env.reset(init)
            obs = settle(env)
            name = f"{suite}_{task}_{init}"
            out[f"{name}/{FULL_IMAGE}"] = np.asarray(obs[FULL_IMAGE])
            out[f"{name}/{WRIST_IMAGE}"] = np.asarray(obs[WRIST_IMAGE])
            out[f"{name}/{STATE}"] = np.asarray(obs[STATE])
            if "gl" not in out:  # while the env's GL context is current
                try:
                    gl = current_gl()
                except Exception as exc:  # noqa: BLE001 - a report
                    gl = {"error": repr(exc)}
                out["gl"] = np.array(json.dumps(gl))
    return out


def compare(mine: dict, ref: dict, policy_dir: str | None, device: str) -> list[dict]:
    from rsd.observation import FULL_IMAGE, STATE, WRIST_IMAGE

    rows = []
    policy = None
    if policy_dir:
        from rsd.policy import load_policy

        kw = {"decode": "greedy"} if policy_dir.rstrip("/").endswith("rsd") else {}
        policy = load_policy(policy_dir, device=device, **kw)
    instructions = {"libero_object": "pick up the alphabet soup and place it in the basket",
                    "libero_spatial": "pick up the black bowl between the plate and the ramekin and place it on the "
                                      "plate"}
    for suite, task, init in SCENES:
        name = f"{suite}_{task}_{init}"
        row: dict = {"scene": name, "state_max_diff": float(np.abs(mine[f"{name}/{STATE}"].astype(np.float64)
                                                                    - ref[f"{name}/{STATE}"]).max())}
        for view in (FULL_IMAGE, WRIST_IMAGE):
            a, b = mine[f"{name}/{view}"].astype(np.int16), ref[f"{name}/{view}"].astype(np.int16)
            d = np.abs(a - b)
            row[view] = {"differing": round(float((d > 0).mean()), 4), "max": int(d.max()),
                         "mean": round(float(d.mean()), 3)}
        if policy is not None:
            chunks = []
            for source in (mine, ref):
                policy.reset()
                obs = {FULL_IMAGE: source[f"{name}/{FULL_IMAGE}"], WRIST_IMAGE: source[f"{name}/{WRIST_IMAGE}"],
                       STATE: mine[f"{name}/{STATE}"]}  # the same proprio: only the pixels differ
                chunks.append(policy.predict_chunk(obs, instructions[suite]))
            a0, a1 = (np.asarray(c.actions, dtype=np.float64) for c in chunks)
            row["policy_action_max_diff"] = float(np.abs(a0 - a1).max())
            h0, h1 = (c.info.get("code_histogram") for c in chunks)
            if h0 is not None:
                row["policy_code_histograms_equal"] = bool(np.array_equal(np.asarray(h0), np.asarray(h1)))
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--compare", default=None, help="an npz another machine saved")
    p.add_argument("--policy", default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    mine = render()
    np.savez_compressed(a.out, **mine)
    print("rendered with", mine["gl"], flush=True)
    if a.compare:
        ref = dict(np.load(a.compare))
        print("reference rendered with", ref["gl"])
        for row in compare(mine, ref, a.policy, a.device):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

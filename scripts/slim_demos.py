"""Copy what a low-dimensional policy trains on out of `rsd collect` demo files, compressed.

    python scripts/slim_demos.py runs/demos/libero_spatial.hdf5 .slim/libero_spatial.hdf5
    python scripts/slim_demos.py --replay runs/demos/libero_spatial.hdf5 .slim/libero_spatial.hdf5

``--replay``: what `rsd render-demos` re-runs and a pixel policy trains on instead: actions, obs/executed_actions
(DART demos), obs/ee_pos, ee_ori, gripper_states, all attributes, every value kept float64 (the re-run executes the
recorded actions and checks the recorded proprio bit for bit); no object poses.

Keeps, per demo: actions, obs/ee_pos, obs/ee_ori, obs/gripper_states and every object's obs/<name>_pos and
obs/<name>_quat, with all demo and file attributes (instruction, suite, task, scene seed and state); drops the
flattened MuJoCo states, joint and robot states and images. Arrays are stored as float32 (what training computes
in), uncompressed (for ~150-step datasets HDF5's per-chunk overhead outweighs what gzip saves). The result reads with `rsd.sim.demos.read_demos` and trains as the full file
does up to float32 rounding of the recorded float64 values (`rsd train-policy`);
it exists to carry demonstrations to a machine that trains on a GPU (the device tool carries 64 MiB a call).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py

KEEP_OBS = ("ee_pos", "ee_ori", "gripper_states")


def slim(src: Path, dst: Path, replay: bool = False) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        data_in = fin["data"]
        data_out = fout.create_group("data")
        for key, value in data_in.attrs.items():
            data_out.attrs[key] = value
        for name, grp in data_in.items():
            out = data_out.create_group(name)
            for key, value in grp.attrs.items():
                out.attrs[key] = value
            objects = json.loads(grp.attrs["rsd_objects"])
            if replay:
                keep = [*KEEP_OBS, *(["executed_actions"] if "executed_actions" in grp["obs"] else [])]
            else:
                keep = [*KEEP_OBS, *(f"{o}_{part}" for o in objects for part in ("pos", "quat"))]
            dtype = "float64" if replay else "float32"
            out.create_dataset("actions", data=grp["actions"][()].astype(dtype))
            obs = out.create_group("obs")
            for key in keep:
                obs.create_dataset(key, data=grp["obs"][key][()].astype(dtype))


if __name__ == "__main__":
    args = sys.argv[1:]
    replay = args[:1] == ["--replay"]
    args = args[1:] if replay else args
    if len(args) != 2:
        sys.exit(__doc__)
    slim(Path(args[0]), Path(args[1]), replay=replay)
    print(f"{args[1]}: {Path(args[1]).stat().st_size / 2**20:.1f} MiB")

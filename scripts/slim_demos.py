"""Copy what a low-dimensional policy trains on out of `rsd collect` demo files, compressed.

    python scripts/slim_demos.py runs/demos/libero_spatial.hdf5 .slim/libero_spatial.hdf5

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


def slim(src: Path, dst: Path) -> None:
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
            keep = [*KEEP_OBS, *(f"{o}_{part}" for o in objects for part in ("pos", "quat"))]
            out.create_dataset("actions", data=grp["actions"][()].astype("float32"))
            obs = out.create_group("obs")
            for key in keep:
                obs.create_dataset(key, data=grp["obs"][key][()].astype("float32"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    slim(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{sys.argv[2]}: {Path(sys.argv[2]).stat().st_size / 2**20:.1f} MiB")

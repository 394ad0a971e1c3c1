"""Golden fixture: OpenVLA-OFT's own image functions on real LIBERO frames (regenerate with scripts/oft_golden.sh).

Two stages, two interpreters, one file:

  render  (rsd's .venv)        render raw camera frames from real LIBERO scenes -> an .npz of frames + names
  oft     (a TensorFlow venv)  run OFT's ``resize_image_for_policy`` and ``center_crop_image``, taken verbatim
                               from ``experiments/robot/openvla_utils.py`` of an openvla-oft checkout, on the
                               rotated frames -> the fixture: frames, OFT's uncropped and cropped model
                               inputs, and the provenance (OFT commit, TensorFlow / numpy / Pillow versions)

Only the three image functions are executed: they are cut out of OFT's file with ``ast`` (the rest of the
file imports torch, transformers and OFT's own packages), and run with OFT's globals ``tf``, ``np``,
``Image`` and ``OPENVLA_IMAGE_SIZE = 224``. TensorFlow never becomes a dependency of rsd.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

OFT_FILE = "experiments/robot/openvla_utils.py"
OFT_FUNCTIONS = ("resize_image_for_policy", "crop_and_resize", "center_crop_image")
# (suite, task id): init state = task id; frames after the 10 settle steps + 2 more dummy steps
SCENES = (("libero_spatial", 0), ("libero_object", 3), ("libero_goal", 5), ("libero_10", 7))
STEPS_AFTER_RESET = 12


def render(out: Path) -> None:
    import numpy as np

    from rsd.sim import libero, protocol

    frames, names = [], []
    for suite, task_id in SCENES:
        with libero.make_env(suite, task_id, render=True) as env:
            env.reset(task_id)
            for _ in range(STEPS_AFTER_RESET):
                env.step(protocol.dummy_action())
            raw = env.raw_obs
            for key in (protocol.AGENTVIEW_KEY, protocol.WRIST_KEY):
                frames.append(np.asarray(raw[key], dtype=np.uint8))
                names.append(f"{suite}/task{task_id}/init{task_id}/step{STEPS_AFTER_RESET}/{key}")
    import mujoco
    import robosuite

    meta = {"renderer": libero.select_renderer().backend, "mujoco": mujoco.__version__,
            "robosuite": robosuite.__version__, "camera_size": int(frames[0].shape[0])}
    np.savez_compressed(out, frames=np.stack(frames), names=np.array(names), render_meta=json.dumps(meta))
    print(f"rendered {len(frames)} frames -> {out}")


def _git(repo: Path, *args: str) -> str:
    git_dir = ["--git-dir", str(repo)] if (repo / "HEAD").is_file() and not (repo / ".git").exists() else ["-C", str(repo)]
    return subprocess.run(["git", *git_dir, *args], capture_output=True, text=True, check=True).stdout


def oft_functions(repo: Path) -> tuple[dict[str, Any], str]:
    """OFT's image functions, executed from the checkout's own source -> (namespace, commit)."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    commit = _git(repo, "rev-parse", "HEAD").strip()
    source = _git(repo, "show", f"{commit}:{OFT_FILE}")
    tree = ast.parse(source)
    picked = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in OFT_FUNCTIONS]
    if sorted(n.name for n in picked) != sorted(OFT_FUNCTIONS):
        raise SystemExit(f"{OFT_FILE} at {commit} lacks some of {OFT_FUNCTIONS}")
    from typing import Any as _Any, Dict, List, Tuple, Union

    namespace: dict[str, Any] = {"tf": tf, "np": np, "Image": Image, "OPENVLA_IMAGE_SIZE": 224,
                                 "Any": _Any, "Dict": Dict, "List": List, "Tuple": Tuple, "Union": Union}
    exec(compile(ast.Module(body=picked, type_ignores=[]), f"openvla-oft/{OFT_FILE}", "exec"), namespace)
    return namespace, commit


def oft(frames_npz: Path, repo: Path, out: Path) -> None:
    import numpy as np
    import PIL
    import tensorflow as tf

    fns, commit = oft_functions(repo)
    data = np.load(frames_npz)
    frames = data["frames"]
    resized, cropped = [], []
    for frame in frames:
        rotated = np.ascontiguousarray(frame[::-1, ::-1])  # OFT's get_libero_image / get_libero_wrist_image
        r = fns["resize_image_for_policy"](rotated, 224)  # OFT's prepare_observation
        resized.append(r)
        cropped.append(np.asarray(fns["center_crop_image"](r)))  # OFT's prepare_images_for_vla, center_crop=True
    provenance = {
        "oft_repository": "https://github.com/moojink/openvla-oft", "oft_commit": commit, "oft_file": OFT_FILE,
        "oft_functions": list(OFT_FUNCTIONS), "tensorflow": tf.__version__, "numpy": np.__version__,
        "pillow": PIL.__version__, "render": json.loads(str(data["render_meta"])),
        "regenerate": "bash scripts/oft_golden.sh OFT_CHECKOUT",
    }
    np.savez_compressed(out, frames=frames, names=data["names"], oft_resized=np.stack(resized),
                        oft_cropped=np.stack(cropped), provenance=json.dumps(provenance, sort_keys=True))
    print(f"OFT outputs for {len(frames)} frames (commit {commit[:12]}, TF {tf.__version__}) -> {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    r = sub.add_parser("render", help="render raw LIBERO frames (rsd's .venv)")
    r.add_argument("--out", type=Path, required=True)
    o = sub.add_parser("oft", help="run OFT's functions on them (a venv with tensorflow-cpu, pillow, numpy)")
    o.add_argument("--frames", type=Path, required=True)
    o.add_argument("--oft-repo", type=Path, required=True, help="openvla-oft checkout (work tree or bare git dir)")
    o.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.stage == "render":
        render(args.out)
    else:
        oft(args.frames, args.oft_repo, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

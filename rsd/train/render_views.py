"""``rsd render-demos``: the camera views of demos recorded without images, rendered by re-running them.

A demo recorded by ``rsd collect`` keeps the scene it started from (``rsd_scene_seed``, ``rsd_scene_init_state``),
the actions the env executed and the proprio it observed. ``rsd.sim.replay_obs.replay_observations`` re-runs the
episode in a rendered env (deterministic given the scene and the actions) and checks its proprio against the
recording at every step; a test compares the frames with a demo recorded with ``--render``. So the unrendered demos
a low-dimensional policy trained on become a pixel policy's demos, the same episodes.

Per step and view, the frame goes through exactly what ``rsd eval`` feeds a policy and what
``rsd.train.pixel_data`` makes of recorded frames: ``rsd.images.oft_model_input`` (rotate 180, JPEG q95 round trip,
Lanczos to 224; ``make_observation`` does it) and then the backbone's ``resize_to_model`` to ``--image-size``.

Fixtures (libero_spatial's cabinet and stove) are model parameters, not part of the state: LIBERO draws their poses
at each reset, and a reset's draw depends on the resets before it. Each scene's poses come from repeating
``rsd collect``'s walk over the scene seeds of its task in a fresh env (``rsd.sensitivity_replay.scene_fixtures``,
which also checks that each seed rebuilds the recorded scene exactly; about 1 s a seed, skipped for scenes without
fixtures). ``--fixtures FILE`` keeps the walk's result as JSON: read when it exists, written otherwise, so a walk
done on one machine serves another.

Output, per demo file ``D.hdf5``: ``D.views<S>.hdf5`` beside it (``views_path``), written as ``.partial`` and
renamed when complete: ``views/<demo name>`` uint8 [T, 2, S, S, 3] (full, wrist), with the demo file's SHA-256, the
camera size, the image size and the command as attributes. ``rsd train-policy --backbone pixel`` reads it for demos
without camera images and refuses one made from another version of the demo file.

    rsd render-demos --demos runs/demos/libero_spatial.hdf5 runs/demos/libero_object.hdf5 --workers 16
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rsd.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError, ShapeError
from rsd.fingerprint import file_sha256
from rsd.sensitivity_replay import demo_id

__all__ = ["HELP", "add_arguments", "run", "views_path", "read_views", "render_views", "VIEWS_FORMAT"]

HELP = "render both camera views of unrendered demos by re-running their recorded actions (pixel training data)"
VIEWS_FORMAT = 1
_PROPRIO = ("ee_pos", "ee_ori", "gripper_states")  # what the replay checks at every step
DEMOS_PER_JOB = 8  # demos one worker renders in a row with one env (env creation amortized; ~100 MB per result)


def views_path(demo_file: str | Path, image_size: int) -> Path:
    """Where the rendered views of ``demo_file`` live: ``<stem>.views<image_size>.hdf5`` beside it."""
    demo_file = Path(demo_file)
    return demo_file.with_name(f"{demo_file.stem}.views{int(image_size)}.hdf5")


def _walk(recorded: Sequence[tuple[Path, Any]], pool: Any) -> dict[str, dict[str, Any]]:
    """The fixture poses of every recorded demo (``rsd.sensitivity_replay.walk_fixtures``), walked in ``pool``."""
    import h5py

    from rsd.sensitivity_replay import scene_fixtures, walk_fixtures

    first_seeds = {}
    for path in dict.fromkeys(p for p, _ in recorded):  # each file once, in order
        with h5py.File(path, "r") as f:
            first = f["data"].attrs.get("rsd_scene_seed_start")
        first_seeds[path] = None if first is None else int(first)
    return walk_fixtures(recorded, first_seeds, lambda tasks: pool.imap(scene_fixtures, tasks),
                         fix="only demos recorded by `rsd collect` can be re-run")


def _as_json(fixtures: dict[str, dict[str, Any]]) -> str:
    return json.dumps({k: {name: [float(v) for v in pose] for name, pose in d.items()} for k, d in fixtures.items()},
                      indent=0, sort_keys=True)


# ------------------------------------------------------------------------------------------------------- render

@dataclass(frozen=True)
class _Job:
    """Consecutive demos of one file and task (picklable)."""

    file: str
    suite: str
    task_id: int
    names: tuple[str, ...]
    scenes: tuple[np.ndarray, ...]  # float64 [S] per demo: rsd_scene_init_state, before the settle steps
    executed: tuple[np.ndarray, ...]  # float64 [T, 7] per demo: the actions the env ran (DART: not the labels)
    proprio: tuple[np.ndarray, ...]  # float64 [T, 8] per demo: recorded ee_pos, ee_ori, gripper_states
    fixtures: tuple[dict[str, Any], ...]  # per demo: fixture name -> pose [7]


class _Renderer:
    """One worker's env (kept while its jobs stay on one task) and the frame pipeline."""

    def __init__(self, camera_size: int, image_size: int) -> None:
        self.camera_size, self.image_size = camera_size, image_size
        self.env: Any = None
        self.task: tuple[str, int] | None = None

    def views(self, job: _Job) -> list[tuple[str, str, np.ndarray]]:
        from rsd.backbones.pixel_views import resize_to_model
        from rsd.observation import FULL_IMAGE, WRIST_IMAGE
        from rsd.sim.libero import make_env
        from rsd.sim.replay_obs import replay_observations

        if self.task != (job.suite, job.task_id):
            self.close()
            self.env = make_env(job.suite, job.task_id, render=True, camera_size=self.camera_size)
            self.task = (job.suite, job.task_id)
        out = []
        for name, scene, executed, proprio, fixtures in zip(job.names, job.scenes, job.executed, job.proprio,
                                                            job.fixtures):
            full, wrist, deviation = [], [], [0.0]
            for obs in replay_observations(self.env, scene, fixtures, executed, proprio, deviation):
                full.append(obs[FULL_IMAGE])
                wrist.append(obs[WRIST_IMAGE])
            views = [resize_to_model(np.stack(frames), self.image_size).numpy() for frames in (full, wrist)]
            out.append((job.file, name, np.stack(views, axis=1), deviation[0]))  # [T, 2, S, S, 3]
        return out

    def close(self) -> None:
        if self.env is not None:
            env, self.env, self.task = self.env, None, None
            env.close()


_RENDERER: _Renderer | None = None


def _init_worker(camera_size: int, image_size: int) -> None:
    global _RENDERER
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    _RENDERER = _Renderer(camera_size, image_size)


def _render_in_worker(job: _Job) -> list[tuple[str, str, np.ndarray]]:
    assert _RENDERER is not None
    return _RENDERER.views(job)


def _jobs(recorded: Sequence[tuple[Path, Any]], fixtures: dict[str, dict[str, Any]]) -> list[_Job]:
    by_task: dict[tuple[str, str, int], list[Any]] = {}
    for path, demo in recorded:
        missing = [k for k in _PROPRIO if k not in demo.obs]
        if missing:
            raise ShapeError(f"{path}:{demo.name} lacks obs/{missing}: the replay checks every step against the "
                             f"recorded proprio; record demos with `rsd collect`.")
        by_task.setdefault((str(path), str(demo.attrs["rsd_suite"]), int(demo.attrs["rsd_task_id"])), []).append(demo)
    jobs = []
    for (path, suite, task_id), demos in by_task.items():
        for i in range(0, len(demos), DEMOS_PER_JOB):
            part = demos[i:i + DEMOS_PER_JOB]
            jobs.append(_Job(path, suite, task_id, tuple(d.name for d in part),
                             tuple(np.asarray(d.attrs["rsd_scene_init_state"], dtype=np.float64) for d in part),
                             tuple(np.asarray(d.obs.get("executed_actions", d.actions), dtype=np.float64)
                                   for d in part),
                             tuple(np.concatenate([np.asarray(d.obs[k], np.float64) for k in _PROPRIO], axis=1)
                                   for d in part),
                             tuple(fixtures[demo_id(path, d.name)] for d in part)))
    return jobs


class _ViewsWriter:
    """One views file, written as ``.partial`` and renamed into place by ``finish``."""

    def __init__(self, demo_file: Path, image_size: int, camera_size: int, command: str) -> None:
        import h5py

        self.final = views_path(demo_file, image_size)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.file = h5py.File(self.partial, "w")
        self.file.attrs.update({"rsd_views_format": VIEWS_FORMAT, "source": demo_file.name,
                                "source_sha256": file_sha256(demo_file), "camera_size": camera_size,
                                "image_size": image_size, "views": json.dumps(["full_image", "wrist_image"]),
                                "rsd_command": command})
        self.group = self.file.create_group("views")

    def add(self, name: str, views: np.ndarray, deviation: float) -> None:
        data = self.group.create_dataset(name, data=views, chunks=(1, *views.shape[1:]))
        data.attrs["max_proprio_deviation"] = deviation  # the re-run vs the recording (rsd.sim.replay_obs)

    def finish(self) -> Path:
        self.file.close()
        os.replace(self.partial, self.final)
        return self.final

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def render_views(demo_files: Sequence[Path], *, image_size: int, camera_size: int, workers: int,
                 fixtures: dict[str, dict[str, Any]] | None = None, progress: bool = False,
                 command: str = "") -> tuple[list[Path], dict[str, float], dict[str, dict[str, Any]]]:
    """Render the views files of ``demo_files`` (:func:`views_path`) with ``workers`` processes; the fixture walk
    first unless ``fixtures`` covers every demo. A demo file whose complete views file is already there is skipped
    (so a stopped run continues where it stopped); each file is renamed into place as soon as its last demo is
    rendered. Returns the files, wall times (walk, render) and the fixtures."""
    import multiprocessing as mp

    from tqdm import tqdm

    from rsd.sim.demos import read_demo_files

    done = [p for p in demo_files if views_path(p, image_size).exists()]
    for path in done:  # CheckpointMismatchError when it is not this demo file's, at this size, complete
        _check_views(path, image_size, [d.name for _, d in read_demo_files([path])])
        print(f"{views_path(path, image_size)}: already rendered, skipped", file=sys.stderr)
    todo = [p for p in demo_files if p not in done]
    recorded = read_demo_files(todo) if todo else []
    times: dict[str, float] = {"walk_s": 0.0, "render_s": 0.0, "steps": 0.0, "max_deviation": 0.0}
    if not todo:
        return [views_path(p, image_size) for p in demo_files], times, fixtures or {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(camera_size, image_size)) as pool:
        t0 = time.perf_counter()
        wanted = {demo_id(p, d.name) for p, d in recorded}
        if fixtures is None or not wanted <= set(fixtures):
            fixtures = _walk(recorded, pool)
        times["walk_s"] = time.perf_counter() - t0
        jobs = _jobs(recorded, fixtures)
        left = {str(p): sum(j.file == str(p) for j in jobs) for p in todo}
        writers = {str(p): _ViewsWriter(Path(p), image_size, camera_size, command) for p in todo}
        total = sum(len(a) for j in jobs for a in j.executed)
        t1 = time.perf_counter()
        try:
            with tqdm(total=total, unit="step", desc="rsd render-demos", disable=not progress, file=sys.stderr) as bar:
                for result in pool.imap_unordered(_render_in_worker, jobs, chunksize=1):
                    for path, name, views, dev in result:
                        writers[path].add(name, views, dev)
                        times["max_deviation"] = max(times.get("max_deviation", 0.0), dev)
                        bar.update(len(views))
                    left[result[0][0]] -= 1
                    if left[result[0][0]] == 0:
                        writers.pop(result[0][0]).finish()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        times["render_s"] = time.perf_counter() - t1
        times["steps"] = float(total)
    return [views_path(p, image_size) for p in demo_files], times, fixtures


# -------------------------------------------------------------------------------------------------------- read

def read_views(demo_file: Path, names: Sequence[str], image_size: int) -> Iterator[np.ndarray]:
    """The views uint8 [T, 2, S, S, 3] of the named demos of ``demo_file``, from its views file (one at a time).
    CheckpointNotFoundError naming ``rsd render-demos`` when there is none; CheckpointMismatchError when it was
    rendered from another version of the demo file or at another size."""
    import h5py

    path = _check_views(demo_file, image_size, names)
    with h5py.File(path, "r") as f:
        for name in names:
            yield f["views"][name][()]


def _check_views(demo_file: Path, image_size: int, names: Sequence[str]) -> Path:
    """The views file of ``demo_file`` after checking its format, size, source SHA-256 and that it holds ``names``."""
    import h5py

    path = views_path(demo_file, image_size)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{demo_file} has no camera images and no rendered views {path.name} beside it: a pixel policy trains on "
            f"images; run `rsd render-demos --demos {demo_file} --image-size {image_size}` (or record with "
            f"`rsd collect --render --camera-size 256`).")
    with h5py.File(path, "r") as f:
        if int(f.attrs.get("rsd_views_format", -1)) != VIEWS_FORMAT or int(f.attrs["image_size"]) != image_size:
            raise CheckpointMismatchError(f"{path} is not a views file of format {VIEWS_FORMAT} at {image_size} px; "
                                          f"render it again with `rsd render-demos`.")
        if f.attrs["source_sha256"] != file_sha256(Path(demo_file)):
            raise CheckpointMismatchError(f"{path} was rendered from another version of {demo_file} (SHA-256 "
                                          f"differs); delete it and run `rsd render-demos --demos {demo_file}`.")
        missing = [n for n in names if n not in f["views"]]
        if missing:
            raise CheckpointMismatchError(f"{path} has no views of {missing[:3]}; delete it and render {demo_file} "
                                          f"again.")
    return path


# --------------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rsd.sim import protocol

    parser.add_argument("--demos", type=Path, nargs="+", required=True,
                        help="HDF5 demos recorded by `rsd collect` (without --render)")
    parser.add_argument("--image-size", type=int, default=128,
                        help="the pixel backbone's input side S the views are resized to (default 128)")
    parser.add_argument("--camera-size", type=int, default=protocol.CAMERA_SIZE,
                        help=f"render size (default {protocol.CAMERA_SIZE}: what rsd eval renders)")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: the usable cores)")
    parser.add_argument("--fixtures", type=Path, default=None,
                        help="JSON of the scenes' fixture poses: read if it exists, else walked and written here")
    parser.add_argument("--walk-only", action="store_true", help="only walk the fixtures into --fixtures")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rsd.limits import check_workers, usable_cores

    workers = args.workers or usable_cores()
    check_workers(workers)
    if args.image_size < 16 or args.camera_size < 16:
        raise ConfigError(f"--image-size and --camera-size must be >= 16, got {args.image_size}, {args.camera_size}.")
    for path in args.demos:
        if not path.is_file():
            raise CheckpointNotFoundError(f"--demos {path} does not exist.")
    fixtures = None
    if args.fixtures is not None and args.fixtures.is_file():
        fixtures = json.loads(args.fixtures.read_text())
    command = shlex.join(["rsd", "render-demos", *sys.argv[2:]])
    if args.walk_only:
        import multiprocessing as mp

        from rsd.sim.demos import read_demo_files

        if args.fixtures is None:
            raise ConfigError("--walk-only writes the fixture poses to --fixtures FILE: pass one.")
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(workers) as pool:
            fixtures = _walk(read_demo_files(args.demos), pool)
        args.fixtures.write_text(_as_json(fixtures))
        print(f"fixture poses of {len(fixtures)} demos -> {args.fixtures} ({time.perf_counter() - t0:.0f} s)")
        return 0
    files, times, fixtures = render_views(args.demos, image_size=args.image_size, camera_size=args.camera_size,
                                workers=workers, fixtures=fixtures, progress=not args.no_progress, command=command)
    if args.fixtures is not None and not args.fixtures.is_file():
        args.fixtures.write_text(_as_json(fixtures))
    steps = int(times["steps"])
    print(f"rendered {steps} steps x 2 views in {times['render_s']:.1f} s ({steps / max(times['render_s'], 1e-9):.0f} "
          f"steps/s, {workers} workers; fixture walk {times['walk_s']:.1f} s; largest proprio deviation of a re-run "
          f"from its recording {times.get('max_deviation', 0.0):.3g}) -> " + ", ".join(str(f) for f in files))
    return 0

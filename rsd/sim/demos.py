"""Demonstration files in LIBERO's HDF5 layout: read, write, and cut into action chunks.

The layout is the one of LIBERO's own demonstration files (``scripts/create_dataset.py`` in
Lifelong-Robot-Learning/LIBERO), so :func:`read_demos` reads official LIBERO files and ours alike::

    data                                attrs: problem_info (JSON: problem_name, domain_name,
                                               language_instruction), env_name, bddl_file_name,
                                               bddl_file_content, macros_image_convention, num_demos, total
    data/demo_<i>/actions               [T, 7]  env actions (gripper -1 open / +1 close)
    data/demo_<i>/states                [T, S]  flattened MuJoCo state before each action
    data/demo_<i>/robot_states          [T, 9]  gripper_qpos 2 + eef_pos 3 + eef_quat 4
    data/demo_<i>/rewards, dones        [T]     uint8, 1 at the last step only
    data/demo_<i>/obs/ee_pos            [T, 3]
    data/demo_<i>/obs/ee_ori            [T, 3]  axis-angle of eef_quat
    data/demo_<i>/obs/ee_states         [T, 6]  ee_pos + ee_ori
    data/demo_<i>/obs/gripper_states    [T, 2]
    data/demo_<i>/obs/joint_states      [T, 7]
    data/demo_<i>/obs/agentview_rgb     [T, h, w, 3] uint8, raw camera (robosuite's image convention)
    data/demo_<i>/obs/eye_in_hand_rgb   [T, h, w, 3] uint8
    data/demo_<i>                       attrs: num_samples, init_state

Differences of files written by ``rsd collect`` (documented, not silent):
- one file may hold several tasks, so every demo also carries its own ``problem_info`` and
  ``language_instruction`` (plus ``rsd_suite``, ``rsd_task_id``, ``rsd_init_state_index``); the file-level
  ``problem_info`` is written only when all demos share one task;
- image datasets exist only for rendered recordings (``rsd collect --render``);
- no ``model_file`` attribute (the task's BDDL file and the init state reproduce the scene);
- recording starts after the 10 settle steps of the eval protocol (LIBERO's own files skip 5 steps).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from rsd.errors import CheckpointNotFoundError, ConfigError, NonFiniteError, ShapeError
from rsd.filelock import exclusive_lock

__all__ = ["Demo", "DemoWriter", "read_demos", "read_demo_files", "action_chunks", "IMAGE_KEYS", "DEMO_FORMAT"]

IMAGE_KEYS: tuple[str, ...] = ("agentview_rgb", "eye_in_hand_rgb")
DEMO_FORMAT = 1  # rsd's version of the layout above (attribute `rsd_format` of files we write)
_ACTION_DIM = 7


def _h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is in the sim extra
        raise ConfigError("reading/writing demo files needs h5py: pip install 'rsd[sim]'") from exc
    return h5py


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _instruction_of(problem_info: Any) -> str | None:
    """``language_instruction`` of a ``problem_info`` JSON attribute (LIBERO may quote it or store a word list)."""
    text = json.loads(_attr_str(problem_info)).get("language_instruction")
    if isinstance(text, list):
        text = " ".join(str(w) for w in text)
    return text.strip().strip('"').strip() if isinstance(text, str) else None


# ---------------------------------------------------------------------------------------------------- record


@dataclass(frozen=True)
class Demo:
    """One demonstration.

    ``actions`` float64 ``[T, 7]`` (env convention); ``obs`` maps LIBERO obs names to ``[T, ...]`` arrays;
    ``states`` float64 ``[T, S]`` or None; ``init_state`` ``[S]`` or None; ``attrs`` holds the remaining
    per-demo attributes (``rsd_suite``, ``rsd_task_id``, ... for our files).
    """

    name: str
    actions: np.ndarray
    instruction: str
    obs: Mapping[str, np.ndarray] = field(default_factory=dict)
    states: np.ndarray | None = None
    init_state: np.ndarray | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        actions = np.asarray(self.actions)
        if actions.ndim != 2 or actions.shape[1] != _ACTION_DIM:
            raise ShapeError(f"demo {self.name!r}: actions must be [T, {_ACTION_DIM}], got {actions.shape}.")
        if not np.isfinite(actions).all():
            raise NonFiniteError(f"demo {self.name!r}: actions contain NaN/inf.")
        T = actions.shape[0]
        for key, value in self.obs.items():
            if np.asarray(value).shape[:1] != (T,):
                raise ShapeError(f"demo {self.name!r}: obs/{key} has {np.asarray(value).shape[:1]} steps, "
                                 f"actions have {T}.")
        if self.states is not None and np.asarray(self.states).shape[:1] != (T,):
            raise ShapeError(f"demo {self.name!r}: states have shape {np.asarray(self.states).shape}, "
                             f"expected [{T}, S].")
        if not isinstance(self.instruction, str) or not self.instruction:
            raise ConfigError(f"demo {self.name!r}: instruction must be a non-empty string.")

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])


# ---------------------------------------------------------------------------------------------------- read


def read_demos(path: str | Path, *, images: bool = False) -> list[Demo]:
    """All demos of one LIBERO-layout HDF5 file, in ``demo_<i>`` numeric order.

    ``images=False`` skips the ``*_rgb`` datasets (the bulk of a file). The instruction comes from the demo's
    own ``language_instruction`` / ``problem_info`` attribute (rsd files) or else the file's ``problem_info``
    (LIBERO files); a demo with neither is an error.
    """
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"demo file {path} does not exist; record one with `rsd collect`.")
    demos: list[Demo] = []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ConfigError(f"{path} has no 'data' group: not a LIBERO-layout demo file (keys: {list(f)}).")
        data = f["data"]
        file_instruction = None
        if "problem_info" in data.attrs:
            file_instruction = _instruction_of(data.attrs["problem_info"])
        names = sorted((k for k in data.keys() if k.startswith("demo_")), key=lambda k: int(k.split("_", 1)[1]))
        for name in names:
            grp = data[name]
            attrs = {k: grp.attrs[k] for k in grp.attrs.keys()}
            instruction = None
            if "language_instruction" in attrs:
                instruction = _attr_str(attrs.pop("language_instruction"))
            elif "problem_info" in attrs:
                instruction = _instruction_of(attrs["problem_info"])
            instruction = instruction or file_instruction
            if not instruction:
                raise ConfigError(f"{path}:{name} has no language instruction (neither the demo nor the file "
                                  f"carries `problem_info`).")
            obs = {}
            if "obs" in grp:
                for key in grp["obs"].keys():
                    if not images and key.endswith("_rgb"):
                        continue
                    obs[key] = grp["obs"][key][()]
            attrs = {k: (_attr_str(v) if isinstance(v, (bytes, str)) else v) for k, v in attrs.items()
                     if k not in ("init_state", "model_file")}
            demos.append(Demo(
                name=name,
                actions=np.asarray(grp["actions"][()], dtype=np.float64),
                instruction=instruction,
                obs=obs,
                states=grp["states"][()] if "states" in grp else None,
                init_state=np.asarray(grp.attrs["init_state"]) if "init_state" in grp.attrs else None,
                attrs=attrs,
            ))
    if not demos:
        raise ConfigError(f"{path} holds no demo_<i> groups.")
    return demos


def read_demo_files(paths: Iterable[str | Path], *, images: bool = False) -> list[tuple[Path, Demo]]:
    """Every demo of several files, in file order then ``demo_<i>`` order, each with the file it came from
    (the training CLIs split and report episodes by ``(file, demo name)``); ``images`` as in :func:`read_demos`."""
    return [(Path(path), demo) for path in paths for demo in read_demos(path, images=images)]


# ---------------------------------------------------------------------------------------------------- write


class DemoWriter:
    """Add demos to a new LIBERO-layout HDF5 file. Use as a context manager; ``close()`` writes the totals.

    ``file_attrs`` go on the ``data`` group (the recorder adds ``macros_image_convention`` there).

    One writer per file: from construction to ``close()`` / ``abort()`` the writer holds an exclusive lock on
    ``<path>.lock`` (``rsd.filelock``), so a second writer of the same path is refused with
    :class:`OutputLockedError` naming the holder, whether or not HDF5's own file locking works (it is often
    off on NFS / Lustre, where two writers would silently lose demos).

    The file is written under ``<path>.partial`` (same directory, only this writer touches it under the lock),
    fsynced, and renamed over ``path`` on a clean ``close()``; so an interrupted recording never leaves a file
    that looks complete. A writer never appends to an existing file: ``overwrite=True`` replaces it whole.
    """

    def __init__(self, path: str | Path, *, env_name: str = "rsd_collect", overwrite: bool = False,
                 file_attrs: Mapping[str, Any] | None = None) -> None:
        h5py = _h5py()
        self.path = Path(path)
        self._overwrite = overwrite
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the folder of {self.path} ({exc.strerror}): choose an --out you can "
                              f"write to.") from exc
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(exclusive_lock(
            self.path.with_name(self.path.name + ".lock"), what=f"rsd collect is to write {self.path}",
            fix="wait for that writer to finish, or choose another --out."))
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._file = None
        try:
            if self.path.exists() and not overwrite:
                raise ConfigError(f"{self.path} exists; choose another --out or delete it first.")
            try:
                self._file = h5py.File(self._partial, "w")
            except OSError as exc:
                raise ConfigError(f"cannot write {self._partial} ({exc}): choose an --out you can write to.") from exc
            self._data = self._file.create_group("data")
            self._data.attrs["env_name"] = env_name
            self._data.attrs["rsd_format"] = DEMO_FORMAT
            for key, value in (file_attrs or {}).items():
                self._data.attrs[key] = value
        except BaseException:
            if self._file is not None:
                self.abort()  # deletes the partial file, releases the lock
            else:
                self._lock.close()
            raise
        self._problem_infos: set[str] = set()
        self._count = 0
        self._total = 0

    def add(self, *, actions: np.ndarray, obs: Mapping[str, np.ndarray], states: np.ndarray, robot_states: np.ndarray,
            problem_info: Mapping[str, Any], attrs: Mapping[str, Any] | None = None) -> str:
        """Write one successful demo; returns its group name. Arrays are ``[T, ...]`` with a common T."""
        actions = np.asarray(actions, dtype=np.float64)
        demo = Demo(name=f"demo_{self._count}", actions=actions,
                    instruction=str(problem_info.get("language_instruction", "")), obs=obs, states=states)
        T = demo.num_steps
        grp = self._data.create_group(demo.name)
        grp.create_dataset("actions", data=actions)
        grp.create_dataset("states", data=np.asarray(states, dtype=np.float64))
        grp.create_dataset("robot_states", data=np.asarray(robot_states, dtype=np.float64))
        ends = np.zeros(T, dtype=np.uint8)
        ends[-1] = 1
        grp.create_dataset("rewards", data=ends)
        grp.create_dataset("dones", data=ends)
        obs_grp = grp.create_group("obs")
        for key, value in obs.items():
            value = np.asarray(value)
            if key in IMAGE_KEYS:
                obs_grp.create_dataset(key, data=value, compression="gzip", compression_opts=4,
                                       chunks=(1, *value.shape[1:]))
            else:
                obs_grp.create_dataset(key, data=value)
        info_json = json.dumps(dict(problem_info), sort_keys=True)
        self._problem_infos.add(info_json)
        grp.attrs["num_samples"] = T
        grp.attrs["init_state"] = np.asarray(states[0], dtype=np.float64)
        grp.attrs["problem_info"] = info_json
        grp.attrs["language_instruction"] = demo.instruction
        for key, value in (attrs or {}).items():
            grp.attrs[key] = value
        self._count += 1
        self._total += T
        return demo.name

    @property
    def num_demos(self) -> int:
        return self._count

    def close(self) -> Path:
        """Write totals, close and move the file into place. Raises if no demo was written."""
        if self._file is None:
            return self.path
        self._data.attrs["num_demos"] = self._count
        self._data.attrs["total"] = self._total
        if len(self._problem_infos) == 1:
            self._data.attrs["problem_info"] = next(iter(self._problem_infos))
        self._file.close()
        self._file = None
        try:
            if self._count == 0:
                self._partial.unlink()
                raise ConfigError(f"no demo was recorded, so {self.path} was not written.")
            _fsync(self._partial)
            if self.path.exists() and not self._overwrite:  # cannot happen under the lock unless written by hand
                raise ConfigError(f"{self.path} appeared while recording (written by a program that does not take "
                                  f"{self.path.name}.lock); the demos are kept in {self._partial}.")
            os.replace(self._partial, self.path)
            _fsync(self.path.parent)
        finally:
            self._lock.close()
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file (after an error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            self._partial.unlink(missing_ok=True)
        finally:
            self._lock.close()

    def __enter__(self) -> "DemoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory after a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- chunks


def action_chunks(demos: Iterable[Demo], chunk_len: int = 8, stride: int = 1) -> np.ndarray:
    """Sliding windows of consecutive actions: float32 ``[N, C, A]``.

    Every window ``actions[t : t + C]`` for ``t = 0, stride, 2*stride, ...`` that lies entirely inside one demo
    (no padding, no window crosses two demos); a demo shorter than ``chunk_len`` contributes none. Actions
    stay in env convention (the caller normalizes). Raises if no demo yields a window.
    """
    if chunk_len < 1 or stride < 1:
        raise ConfigError(f"chunk_len and stride must be >= 1, got chunk_len={chunk_len}, stride={stride}.")
    windows: list[np.ndarray] = []
    count = 0
    for demo in demos:
        count += 1
        a = np.asarray(demo.actions, dtype=np.float32)
        T = a.shape[0]
        if T < chunk_len:
            continue
        idx = np.arange(0, T - chunk_len + 1, stride)[:, None] + np.arange(chunk_len)[None, :]  # [n, C]
        windows.append(a[idx])  # [n, C, A]
    if not windows:
        raise ConfigError(f"none of the {count} demos has {chunk_len} or more steps: no action chunk to cut.")
    return np.concatenate(windows, axis=0)

"""LIBERO environments under the OpenVLA-OFT protocol: tasks, init states, observations and the env.

LIBERO is imported lazily, on first use, after ``rsd.sim.setup.setup_libero`` (its config file, the headless
renderer, a quiet robosuite); the set-up names are re-exported here.

Public surface: ``make_env``, ``LiberoEnv``, ``TaskSpec``, ``list_tasks``, ``task_spec``, ``load_init_states``,
``load_init_state_file``, ``make_observation``, ``reset_inner_env``; from ``rsd.sim.setup``: ``setup_libero``,
``ensure_libero_config``, ``select_renderer``, ``probe_renderer``, ``RendererInfo``, ``rsd_home``,
``libero_package_root``.

Measured on the 2-core CPU box (Mesa llvmpipe EGL, load ~3.5 from other jobs, 2026-11-26): env creation 11 s
rendered / 0.7 s unrendered; reset 6.8 s / 1.1 s; step 740 ms / 24 ms (medians).

Processes: one env per process. Worker pools should use the ``spawn`` start method; each worker calls
``make_env`` itself (set-up is idempotent, cached and safe to run from several processes at once).
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rsd.errors import ConfigError, EnvResetError, NonFiniteError, ShapeError, SimSetupError
from rsd.observation import FULL_IMAGE, OBJECT_NAMES, OBJECT_POSES, RAW, STATE, WRIST_IMAGE
from rsd.sim import protocol
from rsd.sim.setup import (SETUP_HINT, RendererInfo, ensure_libero_config, import_robosuite, libero_package_root,
                           probe_renderer, rsd_home, select_renderer, setup_libero)

__all__ = ["TaskSpec", "list_tasks", "task_spec", "load_init_state_file", "load_init_states", "make_observation",
           "RESET_ATTEMPTS", "reset_inner_env", "LiberoEnv", "make_env",
           # re-exported from rsd.sim.setup
           "SETUP_HINT", "RendererInfo", "ensure_libero_config", "libero_package_root", "probe_renderer", "rsd_home",
           "select_renderer", "setup_libero"]


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """LIBERO prints "[info] using task orders ..." on every benchmark instantiation."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ---------------------------------------------------------------- tasks and init states

@dataclass(frozen=True)
class TaskSpec:
    """One LIBERO task, in the suite's standard task order (OFT uses task order 0)."""

    suite: str
    task_id: int
    name: str
    instruction: str  # LIBERO's task.language (not lower-cased; protocol.prompt_for does that)
    bddl_file: str  # absolute path
    init_states_file: str  # absolute path of the .pruned_init file
    max_steps: int  # protocol.TASK_MAX_STEPS[suite] (the settle phase is extra)


def list_tasks(suite: str) -> list[TaskSpec]:
    """All tasks of ``suite`` (10 each; 90 for libero_90) in benchmark order."""
    max_steps = protocol.max_steps_for(suite)
    root = setup_libero()
    from libero.libero import benchmark

    with _quiet_stdout():
        bench = benchmark.get_benchmark_dict()[suite]()
    specs = []
    for i in range(bench.get_num_tasks()):
        t = bench.get_task(i)
        specs.append(TaskSpec(
            suite=suite, task_id=i, name=t.name, instruction=t.language,
            bddl_file=str(root / "bddl_files" / t.problem_folder / t.bddl_file),
            init_states_file=str(root / "init_files" / t.problem_folder / t.init_states_file),
            max_steps=max_steps,
        ))
    return specs


def task_spec(suite: str, task_id: int) -> TaskSpec:
    tasks = list_tasks(suite)
    if not isinstance(task_id, (int, np.integer)) or not 0 <= task_id < len(tasks):
        raise ConfigError(f"task_id must be an int in [0, {len(tasks)}) for {suite}, got {task_id!r}")
    return tasks[int(task_id)]


def _numpy_reconstruct_globals() -> list[Any]:
    """The exact globals LIBERO's init-state pickles reference (numpy arrays, nothing else)."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    # numpy 2 rebuilds the float64 dtype through its DType class (numpy.dtypes.Float64DType)
    return [(_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.float64))]


def load_init_state_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Load one LIBERO ``.pruned_init`` file -> float64 [N, S] (N init states of S MuJoCo state values).

    Only files inside the installed LIBERO package are accepted; they are unpickled with
    ``torch.load(weights_only=True)`` allowing just numpy's array-reconstruction globals.
    """
    import torch

    init_dir = (libero_package_root() / "init_files").resolve()
    p = Path(path).resolve()
    if not p.is_relative_to(init_dir):
        raise SimSetupError(f"refusing to unpickle {p}: init states load only from the installed LIBERO "
                            f"package ({init_dir})")
    if not p.is_file():
        raise SimSetupError(f"init-state file {p} does not exist: {SETUP_HINT}")
    with torch.serialization.safe_globals(_numpy_reconstruct_globals()):
        states = torch.load(p, weights_only=True)
    if not isinstance(states, np.ndarray) or states.ndim != 2 or states.shape[0] == 0:
        raise ShapeError(f"{p} should hold a [N, S] numpy array of init states, got "
                         f"{type(states).__name__} {getattr(states, 'shape', None)}")
    if not np.all(np.isfinite(states)):
        raise NonFiniteError(f"{p} holds NaN/inf init states")
    return np.asarray(states, dtype=np.float64)


def load_init_states(suite: str, task_id: int) -> np.ndarray:
    """The protocol's init states of one task, float64 [N, S] (N = 50 for the standard suites)."""
    return load_init_state_file(task_spec(suite, task_id).init_states_file)


# ---------------------------------------------------------------- observations

def make_observation(raw: dict[str, Any], *, with_images: bool) -> dict[str, Any]:
    """Raw LIBERO obs -> the policy observation dict (the contract in ``rsd.observation``).

    ``full_image`` / ``wrist_image``: uint8 [224, 224, 3] (``protocol.preprocess_image``: rotated 180°,
    JPEG round trip, Lanczos resize; no center crop, that belongs to the policy), only ``with_images``;
    ``state``: float32 [8] proprio; ``object_poses`` float32 [K, 7] + ``object_names`` (K str, sorted): the task
    objects' poses (privileged, for low-dimensional policies); ``raw``: the LIBERO obs dict itself (scripted experts).
    """
    names = tuple(protocol.object_names(raw))
    obs: dict[str, Any] = {STATE: protocol.proprio_from_obs(raw), OBJECT_POSES: protocol.object_poses(raw, names),
                           OBJECT_NAMES: names, RAW: raw}
    if with_images:
        for key, src in ((FULL_IMAGE, protocol.AGENTVIEW_KEY), (WRIST_IMAGE, protocol.WRIST_KEY)):
            if src not in raw:
                raise ShapeError(f"rendered observation lacks {src!r}; keys: {sorted(raw)}")
            obs[key] = protocol.preprocess_image(raw[src])
    return obs


# ---------------------------------------------------------------- the env

RESET_ATTEMPTS = 10  # resets tried while LIBERO's placement sampler cannot place the objects


def _randomization_error() -> type[BaseException]:
    """robosuite's ``RandomizationError``: what LIBERO's object placement samplers raise when they cannot place
    every object (``libero/libero/envs/regions/base_region_sampler.py``)."""
    import_robosuite()
    from robosuite.utils.errors import RandomizationError

    return RandomizationError


def reset_inner_env(inner: Any, what: str, attempts: int = RESET_ATTEMPTS) -> Any:
    """What LIBERO's ``ControlEnv.reset`` does (``return self.env.reset()``, retried), on ``inner`` = that
    ``ControlEnv``'s ``.env``, with the retry bounded and loud.

    LIBERO retries in ``while True: try ... except RandomizationError ... finally: continue``; the ``continue``
    in ``finally`` discards every exception, so a persistent error spins forever, a one-off error vanishes and
    Ctrl-C is ignored. Here only ``RandomizationError`` is retried, at most ``attempts`` times, then
    :class:`EnvResetError`; any other exception becomes :class:`EnvResetError` at once, with the cause chained;
    KeyboardInterrupt and SystemExit propagate untouched.
    """
    randomization_error = _randomization_error()
    for _attempt in range(attempts):
        try:
            return inner.reset()
        except randomization_error as exc:
            last = exc
        except Exception as exc:
            raise EnvResetError(f"LIBERO could not reset {what}: {type(exc).__name__}: {exc}. This is not a "
                                f"placement retry; see the chained cause (an asset, BDDL or MuJoCo problem: "
                                f"{SETUP_HINT}).") from exc
    raise EnvResetError(f"LIBERO could not place the objects of {what} in {attempts} resets (robosuite "
                        f"RandomizationError: {last}); the task's placement regions are too tight for its "
                        f"objects: check its BDDL file.") from last

class LiberoEnv:
    """One LIBERO task env. ``reset(i)`` starts from benchmark init state i, ``reset_scene(seed)`` from a fresh
    randomized scene; ``step(a)`` returns ``(obs, done)``.

    ``done`` is LIBERO's success flag returned by ``env.step`` (``info['success']`` is never set by
    LIBERO and never read here). Use as a context manager or call ``close()``.
    """

    def __init__(self, task: TaskSpec, *, render: bool = True, camera_size: int = protocol.CAMERA_SIZE,
                 seed: int = protocol.ENV_SEED) -> None:
        if camera_size <= 0:
            raise ConfigError(f"camera_size must be positive, got {camera_size}")
        setup_libero()
        from libero.libero.envs.env_wrapper import ControlEnv, OffScreenRenderEnv

        self.task = task
        self.render = bool(render)
        self.camera_size = int(camera_size)
        self._init_states = load_init_state_file(task.init_states_file)
        kwargs: dict[str, Any] = dict(bddl_file_name=task.bddl_file, camera_heights=self.camera_size,
                                      camera_widths=self.camera_size)
        if self.render:
            self.raw_env = OffScreenRenderEnv(**kwargs)
        else:  # no GL context at all, no camera observables: physics only (~17 ms a step on 2 CPU cores)
            self.raw_env = ControlEnv(has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False,
                                      **kwargs)
        self.raw_env.seed(seed)  # protocol: env.seed(0) once per task env (LIBERO: np.random.seed)
        self._raw_obs: dict[str, Any] | None = None
        self._scene_state: np.ndarray | None = None
        self._steps = 0
        self._closed = False

    # -- episode

    @property
    def num_init_states(self) -> int:
        return int(self._init_states.shape[0])

    @property
    def init_states(self) -> np.ndarray:
        """float64 [N, S] (a read-only view)."""
        view = self._init_states.view()
        view.flags.writeable = False
        return view

    @property
    def steps(self) -> int:
        """Env steps taken since the last reset (settle steps included)."""
        return self._steps

    def reset(self, init_state_index: int) -> dict[str, Any]:
        """``env.reset()`` then ``obs = env.set_init_state(init_states[i])``, as the protocol does; the reset
        is LIBERO's ``ControlEnv.reset`` done here on the inner env (:func:`reset_inner_env`) so that its errors
        surface instead of looping."""
        self._check_open()
        if not isinstance(init_state_index, (int, np.integer)) or not 0 <= init_state_index < self.num_init_states:
            raise ConfigError(f"init_state_index must be an int in [0, {self.num_init_states}), "
                              f"got {init_state_index!r}")
        reset_inner_env(self.raw_env.env, f"{self.task.suite} task {self.task.task_id}")
        raw = self.raw_env.set_init_state(self._init_states[int(init_state_index)])
        self._scene_state = None
        self._raw_obs = raw
        self._steps = 0
        return make_observation(raw, with_images=self.render)

    def reset_scene(self, seed: int) -> dict[str, Any]:
        """A fresh randomized scene instead of a benchmark init state: LIBERO's ``env.reset()`` (objects placed by
        the BDDL's placement samplers) under ``numpy.random.seed(seed)``, then ``set_init_state`` of the state it
        produced, the path ``reset(i)`` takes. The samplers draw from numpy's global generator: it is seeded for
        the reset only and its state restored afterwards, so the same seed gives the same scene in any process,
        whatever ran before. The scene's state is ``scene_state`` (float64 [S], an init state like the benchmark's).
        """
        self._check_open()
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
            raise ConfigError(f"scene seed must be an int in [0, 2**32), got {seed!r}")
        rng_state = np.random.get_state()
        try:
            np.random.seed(int(seed))
            reset_inner_env(self.raw_env.env, f"{self.task.suite} task {self.task.task_id} (scene seed {seed})")
        finally:
            np.random.set_state(rng_state)
        state = np.array(self.raw_env.get_sim_state(), dtype=np.float64)
        raw = self.raw_env.set_init_state(state)
        self._scene_state = state
        self._raw_obs = raw
        self._steps = 0
        return make_observation(raw, with_images=self.render)

    @property
    def scene_state(self) -> np.ndarray | None:
        """The init state of the last ``reset_scene`` (float64 [S], a copy), None before one."""
        return None if self._scene_state is None else self._scene_state.copy()

    def step(self, action: Any, *, images: bool = True) -> tuple[dict[str, Any], bool]:
        """Apply one env-ready action float [7] (gripper -1 open / +1 close) -> ``(obs, done)``; ``images=False``
        leaves the policy images out of ``obs`` (rendered all the same: ``raw`` and ``frame()`` keep them)."""
        self._check_open()
        if self._raw_obs is None:
            raise SimSetupError("call reset(init_state_index) before step()")
        a, horizon = protocol.validate_action(action), self.raw_env.env.horizon
        if self._steps >= horizon:
            raise ConfigError(f"robosuite horizon reached ({horizon} steps); reset() before stepping on")
        raw, _reward, done, _info = self.raw_env.step(a)
        self._raw_obs = raw
        self._steps += 1
        return make_observation(raw, with_images=self.render and images), bool(done)

    def check_success(self) -> bool:
        self._check_open()
        return bool(self.raw_env.check_success())

    def frame(self) -> np.ndarray:
        """The current agentview frame for videos: uint8 [camera_size, camera_size, 3], rotated 180°."""
        if not self.render:
            raise ConfigError("this env was made with render=False: frames need make_env(..., render=True)")
        if self._raw_obs is None:
            raise SimSetupError("call reset(init_state_index) before frame()")
        return protocol.rotate_180(self._raw_obs[protocol.AGENTVIEW_KEY])

    @property
    def raw_obs(self) -> dict[str, Any] | None:
        """The last raw LIBERO obs dict (None before the first reset)."""
        return self._raw_obs

    # -- lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise SimSetupError("this LiberoEnv is closed; make a new one with make_env()")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.raw_env.close()

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"LiberoEnv({self.task.suite}[{self.task.task_id}] {self.task.instruction!r}, "
                f"render={self.render}, camera_size={self.camera_size})")

    # -- replay

    def set_fixture_poses(self, fixtures: dict[str, Any]) -> None:
        """Place every fixture at its pose (``fixture_poses()`` of a scene): written into the model, as LIBERO's
        reset does; the flattened state is untouched."""
        self._check_open()
        names = set(self.raw_env.env.fixtures_dict)
        if set(fixtures) != names:
            raise ConfigError(f"fixtures must give the pose of exactly the fixtures {sorted(names)}, got "
                              f"{sorted(fixtures)}")
        model = self.raw_env.sim.model
        for name, pose in fixtures.items():
            p = np.asarray(pose, dtype=np.float64)
            if p.shape != (7,) or not np.all(np.isfinite(p)):
                raise ShapeError(f"fixture {name!r}: pose must be 7 finite values (pos 3 + quat 4), got {p.shape}")
            body = model.body_name2id(self.raw_env.env.fixtures_dict[name].root_body)
            model.body_pos[body], model.body_quat[body] = p[:3], p[3:]

    def fixture_poses(self) -> dict[str, np.ndarray]:
        """The pose of every fixture (cabinets, stoves, ...: objects without a free joint), float64 [7] each (pos 3 +
        quat 4, MuJoCo's w-first order) by fixture name. LIBERO places fixtures by writing ``model.body_pos`` /
        ``body_quat`` at reset: they are model parameters, not part of the flattened state."""
        self._check_open()
        model = self.raw_env.sim.model
        bodies = {name: model.body_name2id(f.root_body) for name, f in self.raw_env.env.fixtures_dict.items()}
        return {name: np.concatenate([model.body_pos[b], model.body_quat[b]]).astype(np.float64)
                for name, b in bodies.items()}

    def reset_to_state(self, state: Any, fixtures: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start from a given flattened MuJoCo state float [S] (a demo's ``rsd_scene_init_state``), with the
        fixture poses ``fixtures`` (``fixture_poses()`` of the scene; None keeps those the reset drew): the path
        ``reset(i)`` takes, with that state in place of a benchmark init state.

        LIBERO's ``env.reset()`` places objects and fixtures from numpy's global generator before
        ``set_init_state`` overwrites every state value; it is seeded (0) for the reset only and its state restored.
        The fixture poses it draws also depend on the resets this env ran before (measured: the same seed gives
        another cabinet pose on a second reset), so a scene is reproduced exactly only with its own ``fixtures``
        (docs/sensitivity.md). ``scene_state`` is None afterwards (it names ``reset_scene`` scenes only).
        """
        self._check_open()
        s = np.array(state, dtype=np.float64)  # a copy: the caller's array is never aliased
        size = np.asarray(self.raw_env.get_sim_state()).shape
        if s.shape != size:
            raise ShapeError(f"state must be a flattened MuJoCo state of shape {size} for {self.task.suite} task "
                             f"{self.task.task_id}, got {s.shape}: was it recorded from another task?")
        if not np.all(np.isfinite(s)):
            raise NonFiniteError("state has NaN/inf values")
        rng_state = np.random.get_state()
        try:
            np.random.seed(0)
            reset_inner_env(self.raw_env.env, f"{self.task.suite} task {self.task.task_id} (given state)")
        finally:
            np.random.set_state(rng_state)
        if fixtures is not None:
            self.set_fixture_poses(fixtures)
        raw = self.raw_env.set_init_state(s)
        self._scene_state = None
        self._raw_obs = raw
        self._steps = 0
        return make_observation(raw, with_images=self.render)


def make_env(suite: str, task_id: int, *, render: bool = True, camera_size: int = protocol.CAMERA_SIZE,
             seed: int = protocol.ENV_SEED) -> LiberoEnv:
    """The protocol's env for ``suite`` task ``task_id``: 256 px agentview + wrist cameras when ``render``."""
    return LiberoEnv(task_spec(suite, task_id), render=render, camera_size=camera_size, seed=seed)

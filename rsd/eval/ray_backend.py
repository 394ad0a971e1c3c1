"""``rsd eval --backend ray``: the episodes run in Ray actors, on this machine or on a Ray cluster.

Each actor is one :class:`~rsd.eval.runners.EpisodeWorker` (one policy, one env at a time) that asks for one
``num_cpus=1`` (and, for a CUDA policy, a share of the cluster's GPUs). The driver hands out one episode at a time
per actor in task-major order (an actor keeps its env while it stays on a task), collects with ``ray.wait`` and
yields each result as it arrives; only the driver writes files.

An actor that dies while running an episode (its process killed, its node lost, Ray's memory monitor) is replaced
by a fresh one and the episode runs again, counted once; after :attr:`RayRunner.retries` re-runs the episode is
recorded as errored (``WorkerDied: ...``) and the run stops as after any errored episode. An actor whose policy
cannot be made raises that exception in the driver.

With ``policy_server`` (``--policy-server``) the actors' policy is a client of one more actor that holds the policy
and serves them all in batches (``rsd.eval.ray_batched``); the actors then ask for no GPU.

Ray is imported only when :meth:`RayRunner.results` runs: ``pip install 'rsd[dist]'`` provides it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback as _traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from rsd.errors import ConfigError
from rsd.eval.records import EpisodeKey, EpisodeResult
from rsd.eval.runners import EpisodeWorker, WorkerSettings, _picklable, rerun_or_give_up

__all__ = ["PASSED_ENV_VARS", "RayRunner", "import_ray", "actor_env_vars", "gpus_per_actor"]

# What an actor must see as the driver does (only those set in the driver are passed, through runtime_env):
# rsd's cache and LIBERO's config (rsd.sim.setup), the headless renderer, thread counts, offline model caches.
# Not CUDA_VISIBLE_DEVICES / MUJOCO_EGL_DEVICE_ID: Ray gives each GPU actor its own device.
PASSED_ENV_VARS = ("RSD_HOME", "LIBERO_CONFIG_PATH", "MUJOCO_GL", "PYOPENGL_PLATFORM", "__EGL_VENDOR_LIBRARY_FILENAMES",
                   "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "HF_HOME", "HF_HUB_OFFLINE",
                   "TRANSFORMERS_OFFLINE", "TORCH_HOME", "PYTHONPATH")
_WAIT_S = 1.0  # ray.wait timeout: the loop stays responsive to Ctrl-C
_PENDING_NOTICE_S = 60.0  # no actor ready after this long: say what it waits for


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"--backend ray needs the `ray` package ({exc}): pip install 'rsd[dist]' (or "
                          f"pip install 'ray>=2.9'), or run without --backend ray.") from exc
    return ray


def actor_env_vars(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of :data:`PASSED_ENV_VARS` set (non-empty) in ``environ`` (default: this process)."""
    environ = dict(os.environ) if environ is None else environ
    return {k: environ[k] for k in PASSED_ENV_VARS if environ.get(k)}


def gpus_per_actor(policy_device: str | None, cluster_gpus: float, workers: int) -> float:
    """``num_gpus`` of each actor: 0 for a CPU policy (or None: a scripted one, no network); for a CUDA one, a share
    such that all ``workers`` actors fit on the cluster's GPUs (one whole GPU at most: a policy uses one device).
    ConfigError when the cluster has no GPU."""
    if policy_device is None or not policy_device.startswith("cuda"):
        return 0.0
    if policy_device not in ("cuda", "cuda:0"):
        raise ConfigError(f"--device {policy_device} with --backend ray: each actor sees only the GPU Ray gives it, "
                          f"as cuda:0; pass --device cuda.")
    if cluster_gpus <= 0:
        raise ConfigError(f"--device {policy_device} with --backend ray: the Ray cluster has no GPU (ray.cluster_"
                          f"resources() lists none): start the Ray nodes on GPU machines (`ray start ... --num-gpus "
                          f"N`), or pass --device cpu.")
    share = cluster_gpus / workers
    if share >= 1:
        return 1.0
    return int(share * 10_000) / 10_000  # Ray takes 4 decimals; rounded down so that all the actors fit


class _EpisodeActor:
    """The body of a Ray actor (made remote by :func:`_remote_actor`): makes its policy and its worker at start;
    a failure to do so is kept and handed to the driver by :meth:`ready` (the actor itself stays alive)."""

    def __init__(self, settings: WorkerSettings, policy_factory: Callable[[], Any],
                 worker_factory: Callable[[WorkerSettings, Any], Any], threads: int) -> None:
        self.worker: Any = None
        self.fatal: tuple[BaseException, str] | None = None
        try:
            import torch

            torch.set_num_threads(threads)
            self.worker = worker_factory(settings, policy_factory())
        except BaseException as exc:  # set-up failed: the driver re-raises it (ready())
            self.fatal = (_picklable(exc), _traceback.format_exc())

    def ready(self) -> tuple[str, Any]:
        if self.fatal is not None:
            return "fatal", self.fatal
        return "ready", f"pid {os.getpid()} on {socket.gethostname()}"

    def run(self, key: EpisodeKey) -> EpisodeResult:
        return self.worker.run(key)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _probe_cluster(address: str, timeout_s: float = 10.0) -> None:
    """ConfigError unless something answers at the Ray cluster's ``host:port`` (``auto``: the cluster ``ray start``
    last started here): ``ray.init`` keeps trying a dead address for minutes."""
    target: str | None = address.removeprefix("ray://") if address.startswith("ray://") else None
    if target is None:
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # allowed: a Ray without this helper: ray.init alone reports the address
            return
        try:
            target = canonicalize_bootstrap_address(address)
        except ConnectionError as exc:  # "auto" with no cluster started here
            raise ConfigError(f"--address {address}: no Ray cluster runs on this machine ({exc}): start one with "
                              f"`ray start --head`, or pass its HOST:PORT.") from exc
    if not target or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers at {target} ({type(exc).__name__}: {exc}): "
                          f"start it with `ray start --head` (`ray status` on one of its nodes prints the address), "
                          f"or pass the right HOST:PORT.") from exc


def _with_env(options: dict[str, Any], owns: bool) -> dict[str, Any]:
    """``options`` with a ``runtime_env`` of the driver's :func:`actor_env_vars` on a cluster the runner did not
    start (one it starts inherits this process's environment: RayRunner._actor_options)."""
    return options if owns else {**options, "runtime_env": {"env_vars": actor_env_vars()}}


def _remote_actor(ray: Any) -> Any:
    return ray.remote(_EpisodeActor)


def _actor_died_types(ray: Any) -> tuple[type[BaseException], ...]:
    """What ``ray.get`` raises when the actor's process is gone (killed, crashed, its node lost, out of memory)."""
    names = ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "LocalRayletDiedError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


@dataclass
class _Actor:
    slot: int  # the actor's number in this run (replacements get new ones)
    handle: Any
    where: str = "starting"
    key: EpisodeKey | None = None  # the episode it runs


@dataclass
class _Run:
    """The driver's state of one ``results`` call."""

    pending: deque[EpisodeKey]
    actors: dict[int, _Actor] = field(default_factory=dict)
    inflight: dict[Any, _Actor] = field(default_factory=dict)  # ObjectRef -> actor (a ready() or a run())
    deaths: dict[EpisodeKey, int] = field(default_factory=dict)
    startup_deaths: int = 0
    next_slot: int = 0
    stopping: bool = False


class RayRunner:
    """``workers`` Ray actors, each an :class:`EpisodeWorker` with its own policy; results in any order.

    ``address=None`` starts a local Ray instance of ``workers`` CPUs and stops it at the end; ``address`` connects
    to that cluster (``auto``: the one ``ray start`` runs here) and only disconnects at the end. When Ray is
    already initialized in this process, that instance is used and left as it is. ``policy_device`` (what the
    policy factory builds on, ``rsd.policy.factory.policy_device``; None for a scripted policy) decides the GPUs each
    actor asks for (:func:`gpus_per_actor`).

    ``retries``: how often an episode runs again after its actor died under it. ``worker_factory`` makes what
    runs the episodes in an actor (``EpisodeWorker``; tests put a worker on a fake env there; it must pickle).
    """

    def __init__(self, settings: WorkerSettings, policy_factory: Callable[[], Any], workers: int, *,
                 address: str | None = None, policy_device: str | None = "cpu", policy_server: bool = False,
                 window_ms: float | None = None) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}.")
        self.settings, self.policy_factory, self.workers = settings, policy_factory, workers
        self.address, self.policy_device = address, policy_device
        self.policy_server, self.window_ms = policy_server, window_ms  # rsd.eval.ray_batched
        self._server: Any = None  # the policy server actor of a run (policy_server)
        self._server_stats: dict[str, Any] | None = None
        self.on_ready: Callable[[], None] | None = None  # called when the first actor has made its policy
        self.retries = 2
        self.worker_factory: Callable[[WorkerSettings, Any], Any] = EpisodeWorker
        self.restarts = 0  # actors started to replace dead ones (this runner's last run)
        self._actor_cls: Any = None  # set per run: the remote actor class and its options
        self._options: dict[str, Any] = {}

    # ------------------------------------------------------------------ Ray instance

    def _connect(self, ray: Any) -> bool:
        """Initialize Ray unless it already is; True when this runner did (and so shuts it down at the end)."""
        if ray.is_initialized():
            return False
        import logging

        if self.address is None:
            ray.init(address="local", num_cpus=self.workers + int(self.policy_server), include_dashboard=False,
                     logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)
            return True
        _probe_cluster(self.address)
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            auth = "authentication" in f"{exc} {exc.__cause__}".lower()
            raise ConfigError(
                f"--address {self.address}: cannot connect to that Ray cluster ({type(exc).__name__}: {exc}). "
                + ("The cluster asks for its token: run with the token of `ray start` (~/.ray/auth_token or "
                   "RAY_AUTH_TOKEN) and RAY_AUTH_MODE=token. " if auth else "")
                + "Start one with `ray start --head` (`ray status` prints its address) or pass another "
                  "--address.") from exc
        return True

    def _actor_options(self, ray: Any, *, owns: bool) -> dict[str, Any]:
        """Each actor's resources; a ``runtime_env`` with the driver's :func:`actor_env_vars` only on a cluster this
        runner did not start. The instance it starts inherits this process's environment, and its pre-started
        workers (which have no ``runtime_env``) can then become the actors; with one, Ray starts a new worker process
        per actor."""
        resources = ray.cluster_resources()
        cpus, server = resources.get("CPU", 0), int(self.policy_server)
        if cpus < self.workers + server:
            raise ConfigError(f"--workers {self.workers} with --backend ray: the Ray cluster has {cpus:g} CPUs and "
                              f"each actor needs one{' (and the policy server one)' if server else ''}; pass "
                              f"--workers {int(cpus) - server} or fewer, or add nodes (`ray start --address HEAD:PORT` "
                              f"on more machines).")
        gpus = 0.0 if server else gpus_per_actor(self.policy_device, resources.get("GPU", 0), self.workers)
        return _with_env({"num_cpus": 1, "num_gpus": gpus, "max_restarts": 0, "max_task_retries": 0}, owns)

    # ------------------------------------------------------------------ actors

    def _start_server(self, ray: Any, owns: bool) -> None:
        """The policy server actor (``policy_server``), ready: its policy made, or its set-up error raised here."""
        from rsd.eval.batched import DEFAULT_WINDOW_MS
        from rsd.eval.ray_batched import policy_server, server_options

        options = _with_env(server_options(gpus_per_actor(self.policy_device, ray.cluster_resources().get("GPU", 0),
                                                          1)), owns)
        self._server = policy_server(ray).options(**options).remote(self.policy_factory,
                                                                    self.window_ms or DEFAULT_WINDOW_MS)
        kind, payload = ray.get(self._server.ready.remote())
        if kind == "fatal":
            exc, tb = payload
            exc.add_note(f"(in the policy server of rsd eval --backend ray --policy-server)\n{tb}")
            raise exc

    def server_stats(self) -> dict[str, Any] | None:
        """The policy server's batches of the last run (``policy_server``; None without one), with
        ``rsd.eval.batched.BatchedRunner.server_stats``'s keys."""
        if self._server_stats is None:
            return None
        return {"workers": self.workers, **self._server_stats, "worker_restarts": self.restarts}

    def _start(self, run: _Run) -> None:
        factory = self.policy_factory
        if self._server is not None:  # its policy: a client of the server, under its own slot
            from rsd.eval.ray_batched import ServedPolicyFactory

            factory = ServedPolicyFactory(self._server, run.next_slot)
        handle = self._actor_cls.options(**self._options).remote(self.settings, factory, self.worker_factory, 1)
        actor = _Actor(run.next_slot, handle)
        run.next_slot += 1
        run.actors[actor.slot] = actor
        run.inflight[handle.ready.remote()] = actor

    def _dispatch(self, actor: _Actor, run: _Run) -> None:
        """The next episode to ``actor``, or nothing (it stays idle) when none is left or the run is stopping."""
        if run.stopping or not run.pending:
            return
        actor.key = run.pending.popleft()
        run.inflight[actor.handle.run.remote(actor.key)] = actor

    def _died(self, ray: Any, actor: _Actor, exc: BaseException, run: _Run) -> EpisodeResult | None:
        """``actor`` is gone: its episode runs again (on a fresh actor) or, past the retries, is an errored result."""
        del run.actors[actor.slot]
        ray.kill(actor.handle, no_restart=True)
        if self._server is not None:  # the server's batches no longer wait for its slot
            self._server.release.remote(actor.slot)
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        key, result = actor.key, None
        if key is None:
            run.startup_deaths += 1
            print(f"rsd eval: Ray actor {actor.slot} died while making its policy ({type(exc).__name__}: {why})",
                  file=sys.stderr)
            if run.startup_deaths > self.retries:
                raise ConfigError(f"WorkerDied: {run.startup_deaths} Ray actors died before they ran an episode "
                                  f"(last: {type(exc).__name__}: {why}); see their output above.") from exc
        else:
            result = rerun_or_give_up(key, run.deaths, run.pending, retries=self.retries, seed=self.settings.seed,
                                      who=f"Ray actor {actor.slot} ({actor.where})", replacement="actor",
                                      what="the Ray actor", cause=f"{type(exc).__name__}: {why}")
            run.stopping |= result is not None
        if not run.stopping and run.pending and len(run.actors) < self.workers:  # a fresh actor takes its place
            self.restarts += 1
            self._start(run)
        return result

    # ------------------------------------------------------------------ the run

    def results(self, keys: Sequence[EpisodeKey]) -> Iterator[EpisodeResult]:
        if not keys:
            return
        ray = import_ray()
        owns = self._connect(ray)
        run = _Run(pending=deque(keys))
        self.restarts, self._server, self._server_stats = 0, None, None
        finished = False
        try:
            self._options = self._actor_options(ray, owns=owns)
            if self.policy_server:
                self._start_server(ray, owns)
            self._actor_cls = _remote_actor(ray)
            for _ in range(min(self.workers, len(keys))):
                self._start(run)
            yield from self._loop(ray, run)
            finished = True
        finally:
            self._stop(ray, run, graceful=finished)
            if owns:
                ray.shutdown()

    def _loop(self, ray: Any, run: _Run) -> Iterator[EpisodeResult]:
        died_types = _actor_died_types(ray)
        announced, t0, noticed = False, time.monotonic(), False
        while run.inflight:
            done, _ = ray.wait(list(run.inflight), num_returns=1, timeout=_WAIT_S)
            if not done:
                if not announced and not noticed and time.monotonic() - t0 > _PENDING_NOTICE_S:
                    noticed = True
                    print(f"rsd eval: no Ray actor has made its policy after {_PENDING_NOTICE_S:.0f} s; each asks "
                          f"for {self._options['num_cpus']} CPU and {self._options['num_gpus']:g} GPU: "
                          f"`ray status` shows what the cluster has free.", file=sys.stderr)
                continue
            ref = done[0]
            actor = run.inflight.pop(ref)
            try:
                value = ray.get(ref)
            except died_types as exc:
                result = self._died(ray, actor, exc, run)
                if result is not None:
                    yield result
                continue
            if actor.key is None:  # a ready() reply
                kind, payload = value
                if kind == "fatal":
                    exc, tb = payload
                    exc.add_note(f"(in Ray eval actor {actor.slot})\n{tb}")
                    raise exc
                actor.where = payload
                if not announced:
                    announced = True
                    if self.on_ready is not None:
                        self.on_ready()
                self._dispatch(actor, run)
                continue
            actor.key = None
            if self._server is not None:  # its episode is over: the server's batches no longer wait for it
                self._server.release.remote(actor.slot)
            if value.error is not None:
                run.stopping = True
            yield value
            self._dispatch(actor, run)

    def _stop(self, ray: Any, run: _Run, *, graceful: bool) -> None:
        """Close the actors' envs (after a complete run) and end the actors; cancel what is still in flight."""
        for ref in list(run.inflight):
            try:
                ray.cancel(ref)
            except Exception:  # allowed: a finished or actor-less task cannot be cancelled; the kill below ends it
                pass
        if graceful and run.actors:
            try:
                ray.get([a.handle.close.remote() for a in run.actors.values()], timeout=30)
            except Exception as exc:  # the episodes are recorded; an env that failed to close is only reported
                print(f"rsd eval: closing the Ray actors' envs failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        for a in run.actors.values():
            ray.kill(a.handle, no_restart=True)
        run.actors.clear()
        run.inflight.clear()
        if self._server is not None:
            try:
                self._server_stats = ray.get(self._server.stats.remote(), timeout=30)
            except Exception as exc:  # the episodes are recorded; only the server's figures are missing
                print(f"rsd eval: the policy server's statistics are lost ({type(exc).__name__}: {exc})",
                      file=sys.stderr)
            ray.kill(self._server, no_restart=True)

"""``evaluate``: one ``rsd eval`` run, from its settings (:class:`EvalConfig`) to ``summary.json``.

It takes the results directory's lock (``rsd.filelock``: a second eval of the same ``--out`` is refused, naming
the holder), checks ``run.json`` against the settings on ``--resume`` (``rsd.eval.rundir``), runs the episodes not
yet recorded (``rsd.eval.runners``), appends each result (``rsd.eval.records``) and writes and prints the summary
(``rsd.eval.report``). ``run.json`` is written once the start succeeded, before the first episode is recorded.
"""

from __future__ import annotations

import datetime as _dt
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rsd import limits
from rsd.errors import ConfigError
from rsd.eval.records import EpisodeKey, ResultsFile, latest_by_key
from rsd.eval.report import (format_table, plot_summary, protocol_block, renderer_record, renderer_warning,
                             summarize, versions)
from rsd.eval.rundir import (LOCK_NAME, PLOT_NAME, RESULTS_NAME, RUN_NAME, SUMMARY_NAME, RunRecordWriter,
                             carry_versions, check_run_record, prepare_out_dir, write_json_atomic)
from rsd.eval.runners import VIDEO_MODES, ParallelRunner, Runner, SerialRunner, WorkerSettings
from rsd.eval.shards import Shard, request_keys, request_record, shard_keys
from rsd.filelock import exclusive_lock
from rsd.sim import protocol

__all__ = ["BACKENDS", "EvalConfig", "EvalOutcome", "episode_keys", "evaluate"]

# who runs the episodes: local (this process, or --workers spawned processes), batched (--workers env processes and
# one policy here serving them in batches, rsd.eval.batched.BatchedRunner), ray (rsd.eval.ray_backend.RayRunner, on a
# Ray cluster), slurm (a submitit job array of shards, rsd.eval.slurm; each array task runs its shard locally)
BACKENDS = ("local", "batched", "ray", "slurm")


@dataclass(frozen=True)
class EvalConfig:
    """One ``rsd eval`` invocation. ``tasks=None`` means every task of the suite (resolved by ``run``)."""

    suite: str
    policy: str
    out: Path
    trials: int = protocol.NUM_TRIALS_PER_TASK
    tasks: tuple[int, ...] | None = None
    workers: int = 1
    video: str = "none"
    render: bool = True
    resume: bool = False
    seed: int = protocol.SEED
    camera_size: int = protocol.CAMERA_SIZE
    max_episodes: int | None = None
    command: str = ""
    progress: bool = True
    device: str | None = None  # learned policies: default cuda when available
    plot: bool = True  # summary.png (matplotlib)
    fast: bool = False  # learned policies on the CUDA fast path (rsd.policy.factory); recorded in run.json
    trust_remote_code: bool = False  # --trust-remote-code: a saved policy's backbone may run its checkpoint's code
    center_crop: bool = True  # OpenVLA-OFT's centre crop of the model's images (--no-center-crop); in run.json
    decode: str = "saved"  # how an RSD policy decodes (--decode: rsd.policy.decode); in run.json
    threshold: float | int | None = None  # --threshold of --decode relaxed / match_rate
    check_greedy: bool | None = None  # --check-greedy (None: on for --decode exact)
    shard: Shard | None = None  # --shard i/N: only that slice of the requested episodes (rsd.eval.shards)
    backend: str = "local"  # --backend (BACKENDS); recorded in run.json for information, --resume may change it
    address: str | None = None  # --address of the Ray cluster (backend ray only)
    batch_window_ms: float | None = None  # --batch-window-ms of the policy server (backend batched only)
    batch_pad: bool = False  # --batch-pad: every batch padded to one row per worker (backend batched only)
    policy_server: bool = False  # --policy-server: one Ray actor serves every env actor in batches (backend ray only)

    def __post_init__(self) -> None:
        protocol.max_steps_for(self.suite)  # unknown suite -> ConfigError listing the suites
        if not str(self.out).strip():
            raise ConfigError("--out is empty: pass the results directory (a new or empty one, or the directory of "
                              "an earlier rsd eval with --resume).")
        object.__setattr__(self, "out", Path(self.out))
        limits.check_seed(self.seed)
        if self.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {self.trials}.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {BACKENDS}, got {self.backend!r}.")
        if self.address is not None and self.backend != "ray":
            raise ConfigError(f"--address {self.address} names a Ray cluster and applies to --backend ray only; "
                              f"drop --address or pass --backend ray.")
        if self.policy_server and self.backend != "ray":
            raise ConfigError("--policy-server puts the policy in one Ray actor that serves every env actor: it "
                              "applies to --backend ray only (on one host, --backend batched does the same); drop it "
                              "or pass --backend ray.")
        served = self.backend == "batched" or self.policy_server
        if self.batch_window_ms is not None and (not served or not self.batch_window_ms > 0):
            raise ConfigError(f"--batch-window-ms {self.batch_window_ms} is the policy server's wait (--backend "
                              f"batched, or --backend ray --policy-server), a number of milliseconds > 0: fix it, or "
                              f"drop it.")
        if self.batch_pad and self.backend != "batched":
            raise ConfigError("--batch-pad pads the policy server's batches of --backend batched: drop it, or pass "
                              "--backend batched.")
        if served:  # a policy that cannot serve several episodes at once: before anything is written
            _check_batched_policy(self.policy)
        if self.shard is not None and not isinstance(self.shard, Shard):
            raise ConfigError(f"shard must be a rsd.eval.shards.Shard (parse_shard('i/N')), got {self.shard!r}.")
        if self.backend in ("local", "batched"):  # Ray places its workers on a cluster; a SLURM array task checks
            limits.check_workers(self.workers)  # its own cores
        elif self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}.")
        if self.video not in VIDEO_MODES:
            raise ConfigError(f"--video must be one of {VIDEO_MODES}, got {self.video!r}.")
        if self.video != "none" and not self.render:
            raise ConfigError(f"--video {self.video} needs rendered frames: drop --no-render or pass --video none.")
        if self.camera_size < 1:
            raise ConfigError(f"--camera-size must be positive, got {self.camera_size}.")
        if self.max_episodes is not None and self.max_episodes < 1:
            raise ConfigError(f"--max-episodes must be >= 1, got {self.max_episodes}.")
        if self.tasks is not None:
            if not self.tasks:
                raise ConfigError("--tasks selects no task.")
            object.__setattr__(self, "tasks", tuple(int(t) for t in self.tasks))
        choice = self.decode_choice  # --decode that cannot apply: refused before anything is written
        if self.fast:  # before anything is written: a scripted policy or an explicit non-CUDA --device
            from rsd.policy.factory import check_fast

            check_fast(self.policy, self.device, speculative=choice.speculative)
        if not self.center_crop:  # only openvla-oft:PATH takes it: refused before anything is written
            from rsd.policy.identity import model_center_crop

            model_center_crop(self.policy, self.center_crop)
        if self.device is not None:  # a CUDA device on a machine without one: refused before anything is written
            from rsd.policy.factory import check_device

            check_device(self.device)

    @property
    def max_steps(self) -> int:
        return protocol.max_steps_for(self.suite)

    @functools.cached_property
    def decode_choice(self) -> Any:
        """``--decode/--threshold/--check-greedy`` checked against the policy and resolved
        (``rsd.policy.decode.DecodeChoice``; reads only a saved policy's ``policy.json``)."""
        from rsd.policy.decode import resolve_decode

        return resolve_decode(self.policy, self.decode, self.threshold, self.check_greedy)

    @functools.cached_property
    def policy_identity(self) -> dict[str, Any]:
        """What stands behind ``policy`` (``rsd.policy.factory.policy_identity``: kind, statistics key, content
        hash of its files), computed once: hashing a checkpoint reads all of it."""
        from rsd.policy.factory import policy_identity

        return policy_identity(self.policy, center_crop=self.center_crop)

    def run_record(self, task_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """What every recorded episode depends on (written to ``run.json``). ``policy`` is the ``--policy`` text
        as given (for reading); ``--resume`` compares the ``policy_*`` keys, which do not depend on how a path
        was written. Also recorded, not compared by ``--resume`` (``rsd.eval.rundir.RUN_KEYS``): ``backend``, and
        ``versions`` (compared by ``rsd merge``); compared only for a shard: ``shard`` and the whole ``request``
        (``task_ids``, default ``tasks``) it is a slice of."""
        from rsd.policy.factory import policy_device

        identity = self.policy_identity
        return {"suite": self.suite, "policy": self.policy, "policy_kind": identity["kind"],
                "policy_unnorm_key": identity["unnorm_key"], "policy_content": identity["content"],
                "device": policy_device(self.policy, self.device), "seed": self.seed, "render": self.render,
                "camera_size": self.camera_size, "max_steps": self.max_steps,
                "num_steps_wait": protocol.NUM_STEPS_WAIT, "fast": self.fast,
                "policy_center_crop": identity["center_crop"], **self.decode_choice.record(),
                "backend": self.backend, "shard": None if self.shard is None else self.shard.record(),
                "request": request_record(self.suite, self.tasks if task_ids is None else task_ids, self.trials),
                "versions": versions()}


def _check_batched_policy(spec: str) -> None:
    """ConfigError for a policy server (``--backend batched``, ``--backend ray --policy-server``) with a policy spec
    that has no ``predict_chunks`` (the scripted ones and OpenVLA-OFT's own pipeline); the server checks the policy it
    makes too (``rsd.eval.batched.check_batchable``)."""
    from rsd.policy.identity import is_scripted

    if is_scripted(spec) or spec == "openvla-oft" or spec.startswith("openvla-oft:"):
        raise ConfigError(f"a policy server (--backend batched, --backend ray --policy-server) serves several "
                          f"episodes with one learned policy (predict_chunks); --policy {spec} runs one episode at a "
                          f"time: use --backend local (--workers K) or ray without --policy-server, or a learned "
                          f"policy (lowdim, lowdim-l1, a directory saved by RSDPolicy / L1Policy).")


@dataclass(frozen=True)
class EvalOutcome:
    summary: dict[str, Any]
    exit_code: int
    new_episodes: int


def episode_keys(config: EvalConfig, task_ids: Sequence[int]) -> list[EpisodeKey]:
    """The episodes this run covers: the requested ones in task-major order, or its ``--shard``'s slice of them."""
    return shard_keys(request_keys(config.suite, task_ids, config.trials), config.shard)


def _default_runner(config: EvalConfig, policy_factory: Callable[[], Any]) -> Runner:
    settings = WorkerSettings(suite=config.suite, render=config.render, camera_size=config.camera_size,
                              seed=config.seed, video=config.video, out=config.out)
    if config.backend == "ray":
        from rsd.eval.ray_backend import RayRunner
        from rsd.policy.factory import policy_device

        return RayRunner(settings, policy_factory, config.workers, address=config.address,
                         policy_device=policy_device(config.policy, config.device),
                         policy_server=config.policy_server, window_ms=config.batch_window_ms)
    if config.backend == "batched":
        from rsd.eval.batched import DEFAULT_WINDOW_MS, BatchedRunner

        return BatchedRunner(settings, policy_factory, config.workers,
                             window_ms=config.batch_window_ms or DEFAULT_WINDOW_MS, pad=config.batch_pad)
    if config.backend == "slurm" and config.shard is None:
        raise ConfigError("--backend slurm runs one shard per SLURM array task (rsd.eval.slurm.run_slurm submits "
                          "them); evaluate() ran it without a shard: pass --shards N on the rsd eval command line.")
    if config.workers > 1:
        return ParallelRunner(settings, policy_factory, config.workers)
    return SerialRunner(settings, policy_factory)


def evaluate(config: EvalConfig, task_ids: Sequence[int], *, policy_factory: Callable[[], Any] | None = None,
             runner: Runner | None = None) -> EvalOutcome:
    """Run the requested episodes not yet recorded, append each result, write and print the summary.

    ``policy_factory`` (default ``make_policy(config.policy)``) is called once per process (must pickle for
    ``workers > 1``). ``runner`` replaces the LIBERO runner (tests). Exit code 1 when an episode errored.
    ``config.policy`` must be a spec rsd resolves (``rsd.policy.factory.policy_identity``: its files are hashed
    into ``run.json``) also when ``policy_factory`` or ``runner`` makes the policy: name the one they run.
    """
    out = config.out
    prepare_out_dir(out)
    if runner is None and config.workers > 1 and config.backend != "ray":
        limits.warn_worker_memory(config.workers)
    t_start = time.perf_counter()
    with exclusive_lock(out / LOCK_NAME, what=f"rsd eval is to write {out}",
                        fix="wait for that eval to finish, or choose another --out."):
        results_file = ResultsFile(out / RESULTS_NAME)
        has_records = results_file.exists_nonempty()
        if has_records and not config.resume:
            raise ConfigError(f"{results_file.path} already holds results: pass --resume to continue that eval, "
                              f"or choose another --out.")
        wanted = config.run_record(task_ids)  # hashes the files behind --policy (once)
        check_run_record(out / RUN_NAME, wanted, resume=config.resume, has_records=has_records)
        wanted = carry_versions(out / RUN_NAME, wanted, has_records=has_records)
        started = RunRecordWriter(out / RUN_NAME, wanted)
        records = results_file.load(repair=True)
        keys = episode_keys(config, task_ids)
        latest = latest_by_key(records)
        done = {k for k in keys if k in latest and latest[k].error is None}  # errored ones are re-run
        todo = [k for k in keys if k not in done]
        if config.max_episodes is not None:
            todo = todo[: config.max_episodes]
        if runner is None:
            if policy_factory is None:
                from functools import partial

                from rsd.policy.factory import make_policy

                policy_factory = partial(make_policy, config.policy, suite=config.suite, device=config.device,
                                         fast=config.fast, trust_remote_code=config.trust_remote_code,
                                         center_crop=config.center_crop, decode=config.decode_choice.mode,
                                         threshold=config.decode_choice.threshold,
                                         check_greedy=config.decode_choice.check_greedy)
            runner = _default_runner(config, policy_factory) if todo else None
            if isinstance(runner, SerialRunner):  # its constructor made the policy: the start succeeded
                started()
            elif runner is not None:  # ParallelRunner, RayRunner, BatchedRunner: when the first worker is ready
                runner.on_ready = started

        bar = _progress(total=len(keys), initial=len(done), enabled=config.progress)
        new, errored, interrupted = 0, 0, False
        successes = sum(latest[k].success for k in done)
        try:
            if runner is not None and todo:
                for result in runner.results(todo):
                    started()  # no episode is recorded without its run.json
                    results_file.append(result)
                    records.append(result)
                    new += 1
                    errored += result.error is not None
                    successes += result.success
                    bar.update(1)
                    bar.set_postfix(success=f"{successes}/{bar.n}", refresh=False)
                    if result.error is not None:
                        print(f"\nrsd eval: task {result.task_id} trial {result.trial} failed with "
                              f"{result.error}\n{result.traceback or ''}", file=sys.stderr)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()

        summary = summarize(records, keys)
        final = list(latest_by_key(records).values())  # the last record of every episode
        summary.update({
            "suite": config.suite, "policy": config.policy, "seed": config.seed, "render": config.render,
            "camera_size": config.camera_size, "fast": config.fast, "decode": config.decode_choice.summary(),
            "center_crop": config.policy_identity["center_crop"], "trials": config.trials, "tasks": list(task_ids),
            "shard": wanted["shard"], "backend": config.backend,
            "protocol": protocol_block(config.max_steps, protocol.NUM_STEPS_WAIT, protocol.DUMMY_ACTION),
            "renderer": renderer_record(config.render, final),
            "versions": wanted["versions"],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": config.command,
            "wall_s": time.perf_counter() - t_start,
            "episodes_this_run": new,
            "episode_wall_s_total": float(sum(r.wall_s for r in final)),
        })
        mixed = renderer_warning(summary["renderer"])
        if mixed:
            print(f"rsd eval: {mixed}", file=sys.stderr)
        server = getattr(runner, "server_stats", None)
        stats = server() if callable(server) else None
        if stats is not None:  # a policy server (--backend batched, ray --policy-server): the batches it reached
            summary["batched"] = stats
        started()  # the runner did not raise: the run started (episodes may be cut by Ctrl-C)
        write_json_atomic(out / SUMMARY_NAME, summary)
        if config.plot:
            decode = "" if config.decode == "saved" else f" · {config.decode}"
            title = f"{config.suite} · {config.policy}{decode}{' · fast' if config.fast else ''} · seed {config.seed}"
            plot_summary(summary, out / PLOT_NAME, title)
    print(format_table(summary))
    if "batched" in summary:
        from rsd.eval.batched import format_server_stats

        print(format_server_stats(summary["batched"]))
    print(f"wrote {out / SUMMARY_NAME}{', ' + str(out / PLOT_NAME) if config.plot else ''} and {out / RESULTS_NAME} "
          f"({new} new episodes)")
    if interrupted:
        print("rsd eval: interrupted; rerun with --resume to continue.", file=sys.stderr)
        return EvalOutcome(summary, 130, new)
    return EvalOutcome(summary, 1 if errored else 0, new)


class _NoBar:
    n = 0

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        bar = _NoBar()
        bar.n = initial
        return bar
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="ep", desc="rsd eval", dynamic_ncols=True, file=sys.stderr)

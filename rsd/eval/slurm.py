"""``rsd eval --backend slurm --shards N``: the eval as a SLURM job array of shards (submitit), merged at the end.

Array task ``i`` runs ``evaluate`` on shard ``i/N`` (``rsd.eval.shards``) into ``OUT/shards/shard-<i>-of-<N>``, always
with ``--resume``; the submitting process waits (printing how many shards are done), writes what each job reported
to ``OUT/slurm/jobs.json`` and merges the shards into OUT (``rsd.eval.merge``: ``episodes.jsonl``, ``summary.json``,
``summary.png``, ``run.json``). submitit keeps its job scripts, pickles and logs in ``OUT/slurm/``.

Rerunning the same command continues: shards already complete get no job, partial ones resume (nothing counted
twice), then everything is merged again. Before anything is submitted, each existing shard's ``run.json`` is checked
against the command (``--resume``'s check: other policy files or settings are refused), and OUT must be new, empty
or an earlier run of this backend with the same ``--shards``.

Inside each array task LIBERO is set up before it is imported (``rsd.sim.setup`` on first use of
``rsd.sim.libero``), on the compute node. ``RSD_HOME``, ``MUJOCO_GL``, ``PYOPENGL_PLATFORM`` and
``LIBERO_CONFIG_PATH`` are taken as the user set them when ``rsd eval`` started (:func:`submitting_env`, before this
process probed a renderer of its own) and set in the job exactly so, unset ones removed: a site whose SLURM exports
no environment still gets them, and the submit host's renderer probe never decides the compute node's.

``--slurm-executor local`` runs the same code through submitit's ``LocalExecutor`` (one process per shard on this
machine, no SLURM): the tests use it; the ``--slurm-*`` resource options other than ``--slurm-time`` do not apply
there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from rsd import limits
from rsd.errors import ConfigError
from rsd.eval.evaluation import EvalConfig, evaluate
from rsd.eval.merge import check_merge_out, merge_runs, report
from rsd.eval.records import ResultsFile, latest_by_key
from rsd.eval.rundir import RESULTS_NAME, RUN_NAME, check_run_record, write_json_atomic
from rsd.eval.shards import Shard, request_keys, shard_dir_name, shard_keys

__all__ = ["SHARDS_DIR", "JOBS_DIR", "ENV_NAMES", "SlurmOptions", "add_arguments", "options_from_args",
           "submitting_env", "check_out", "shard_configs", "run_shard", "run_slurm"]

SHARDS_DIR = "shards"
JOBS_DIR = "slurm"
ENV_NAMES = ("RSD_HOME", "MUJOCO_GL", "PYOPENGL_PLATFORM", "LIBERO_CONFIG_PATH")
EXECUTORS = ("slurm", "local")


@dataclass(frozen=True)
class SlurmOptions:
    """How the array is submitted. ``None`` leaves a resource to the site's defaults (``cpus_per_task``: --workers)."""

    shards: int
    executor: str = "slurm"
    partition: str | None = None
    time_min: int = 120
    cpus_per_task: int | None = None
    gpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    additional: Mapping[str, str] = field(default_factory=dict)
    poll_s: float = 10.0

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ConfigError(f"--shards must be >= 1, got {self.shards}.")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--slurm-executor must be one of {EXECUTORS}, got {self.executor!r}.")
        for name in ("time_min", "cpus_per_task", "array_parallelism"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--slurm-{name.replace('_min', '').replace('_', '-')} must be >= 1, got {value}.")
        for name in ("gpus_per_task", "mem_gb"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--slurm-{name.replace('_', '-')} must be >= 0, got {value}.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--shards`` and ``--slurm-*`` options of ``rsd eval`` (all refused without ``--backend slurm``)."""
    group = parser.add_argument_group("--backend slurm (a submitit job array of shards, merged into --out)")
    group.add_argument("--shards", type=int, default=None,
                       help="number of shards = array tasks; shard i runs into OUT/shards/shard-i-of-N with resume on, "
                            "then all are merged into OUT (as rsd merge; exit 3 when episodes are missing, 1 when a "
                            "job failed). Rerun the same command to continue after a kill: complete shards are not "
                            "resubmitted, partial ones continue")
    group.add_argument("--slurm-executor", choices=EXECUTORS, default=None,
                       help="slurm (default: sbatch through submitit) or local (submitit's LocalExecutor: one process "
                            "per shard on this machine, no cluster; the same code path, used by the tests)")
    group.add_argument("--slurm-partition", default=None, help="SLURM partition")
    group.add_argument("--slurm-time", type=int, default=None, metavar="MINUTES",
                       help="time limit of each array task in minutes (default 120)")
    group.add_argument("--slurm-cpus-per-task", type=int, default=None, help="CPUs per array task (default --workers)")
    group.add_argument("--slurm-gpus-per-task", type=int, default=None, help="GPUs per array task")
    group.add_argument("--slurm-mem-gb", type=float, default=None, help="memory per array task in GB")
    group.add_argument("--slurm-array-parallelism", type=int, default=None,
                       help="at most this many array tasks run at once")
    group.add_argument("--slurm-opt", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, repeatable (submitit's slurm_additional_parameters), e.g. "
                            "--slurm-opt account=myproj --slurm-opt qos=high")


def options_from_args(args: argparse.Namespace) -> SlurmOptions | None:
    """The options of ``--backend slurm``; None for other backends, where any ``--shards``/``--slurm-*`` is refused."""
    given = [f"--{name.replace('_', '-')}" for name in ("shards", "slurm_executor", "slurm_partition", "slurm_time",
                                                         "slurm_cpus_per_task", "slurm_gpus_per_task", "slurm_mem_gb",
                                                         "slurm_array_parallelism", "slurm_opt")
             if getattr(args, name) not in (None, [])]
    if args.backend != "slurm":
        if given:
            raise ConfigError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --backend slurm only; "
                              f"pass --backend slurm or drop {'it' if len(given) == 1 else 'them'}.")
        return None
    if args.shards is None:
        raise ConfigError("--backend slurm needs --shards N (the number of array tasks the episodes are split into).")
    extra: dict[str, str] = {}
    for opt in args.slurm_opt:
        key, sep, value = opt.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm-opt takes KEY=VALUE (an sbatch option without its dashes, e.g. "
                              f"account=myproj), got {opt!r}.")
        extra[key.strip()] = value
    executor = args.slurm_executor or "slurm"
    return SlurmOptions(shards=args.shards, executor=executor, partition=args.slurm_partition,
                        time_min=args.slurm_time or 120, cpus_per_task=args.slurm_cpus_per_task,
                        gpus_per_task=args.slurm_gpus_per_task, mem_gb=args.slurm_mem_gb,
                        array_parallelism=args.slurm_array_parallelism, additional=extra,
                        poll_s=1.0 if executor == "local" else 10.0)


def submitting_env() -> dict[str, str | None]:
    """:data:`ENV_NAMES` as this process has them now (call it before anything sets LIBERO up here)."""
    return {name: os.environ.get(name) for name in ENV_NAMES}


def check_out(out: Path, count: int) -> None:
    """OUT: new, empty or an earlier run of this backend, whose shards (if any) are of the same count."""
    check_merge_out(out, [], also_allowed=(SHARDS_DIR, JOBS_DIR))
    shards_dir = out / SHARDS_DIR
    if shards_dir.is_dir():
        wanted = {shard_dir_name(Shard(i, count)) for i in range(count)}
        other = sorted(set(os.listdir(shards_dir)) - wanted)
        if other:
            raise ConfigError(f"{shards_dir} holds {', '.join(other[:4])}, not shards of --shards {count}: this --out "
                              f"was run with another shard count. Pass the same --shards, or another --out.")


def shard_configs(config: EvalConfig, count: int) -> list[EvalConfig]:
    """The configuration of every array task: shard i/N into ``OUT/shards/shard-i-of-N``, resume on, no bar."""
    shards = [Shard(i, count) for i in range(count)]
    return [dataclasses.replace(config, shard=s, out=config.out / SHARDS_DIR / shard_dir_name(s), resume=True,
                                progress=False) for s in shards]


def _complete(shard_config: EvalConfig, task_ids: Sequence[int], wanted: Mapping[str, Any]) -> bool:
    """Whether the shard's directory holds a clean record of each of its episodes; its run.json is checked against
    ``wanted`` first (ResumeMismatchError naming the difference, as --resume does)."""
    results = ResultsFile(shard_config.out / RESULTS_NAME)
    has_records = results.exists_nonempty()
    record = {**wanted, "shard": shard_config.shard.record()}
    check_run_record(shard_config.out / RUN_NAME, record, resume=True, has_records=has_records)
    latest = latest_by_key(results.load())
    keys = shard_keys(request_keys(shard_config.suite, task_ids, shard_config.trials), shard_config.shard)
    return all(k in latest and latest[k].error is None for k in keys)


def run_shard(config: EvalConfig, task_ids: Sequence[int], env: Mapping[str, str | None]) -> dict[str, Any]:
    """One array task (runs in the job): set the submitting environment, re-check the config here, evaluate."""
    libero_loaded = "libero" in sys.modules  # must be False: LIBERO is set up before it is imported
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    limits.check_workers(config.workers)  # this node's cores (EvalConfig leaves them to the array task)
    config = dataclasses.replace(config)  # validated again on this node (its devices)
    outcome = evaluate(config, task_ids)
    return {"shard": config.shard.record(), "exit_code": outcome.exit_code, "new_episodes": outcome.new_episodes,
            "host": socket.gethostname(), "libero_imported_before_setup": libero_loaded,
            "env": {name: os.environ.get(name) for name in ENV_NAMES}}


def _executor(options: SlurmOptions, folder: Path, workers: int) -> Any:
    try:
        import submitit
    except ImportError as exc:
        raise ConfigError("--backend slurm submits through submitit, which is not installed: pip install -e '.[dist]' "
                          "(or pip install submitit).") from exc
    if options.executor == "local":
        executor = submitit.LocalExecutor(folder=folder / "%j")
        executor.update_parameters(timeout_min=options.time_min)
        return executor
    if shutil.which("srun") is None or shutil.which("sbatch") is None:
        raise ConfigError("--slurm-executor slurm needs SLURM's sbatch and srun on PATH, and this machine has none: "
                          "run rsd eval on a SLURM login node, or pass --slurm-executor local to run the shards here.")
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    params = {"job_name": "rsd-eval", "time": options.time_min, "cpus_per_task": options.cpus_per_task or workers,
              "partition": options.partition, "gpus_per_task": options.gpus_per_task,
              "mem": None if options.mem_gb is None else f"{options.mem_gb:g}GB",
              "array_parallelism": options.array_parallelism,
              "additional_parameters": dict(options.additional) or None}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def run_slurm(config: EvalConfig, task_ids: Sequence[int], options: SlurmOptions,
              env: Mapping[str, str | None] | None = None) -> int:
    """Submit the shards not yet complete, wait, merge into ``config.out``; the exit code: 0, 1 when a job failed or
    an episode errored, else :data:`rsd.eval.merge.MISSING_EXIT` when episodes are missing (e.g. --max-episodes)."""
    out, count = config.out, options.shards
    check_out(out, count)
    env = submitting_env() if env is None else dict(env)
    configs = shard_configs(config, count)
    wanted = config.run_record(task_ids)  # hashes the policy files once
    todo = [c for c in configs if not _complete(c, task_ids, wanted)]
    print(f"rsd eval (slurm): {count - len(todo)} of {count} shards already complete; submitting {len(todo)} "
          f"({options.executor} executor, logs in {out / JOBS_DIR})", file=sys.stderr)
    reports: list[dict[str, Any]] = []
    failed: list[str] = []
    if todo:
        (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        executor = _executor(options, out / JOBS_DIR, config.workers)
        jobs = executor.map_array(run_shard, todo, [list(task_ids)] * len(todo), [env] * len(todo))
        pending = dict(zip((c.shard for c in todo), jobs))
        try:
            while pending:
                for shard, job in sorted(pending.items()):
                    if not job.done():
                        continue
                    del pending[shard]
                    try:
                        result = job.result()
                    except Exception as exc:  # the job raised or was killed: its shard stays partial, listed
                        failed.append(f"shard {shard} (job {job.job_id}, log {job.paths.stderr}): "
                                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}")
                        result = {"shard": shard.record(), "error": str(exc)}
                    reports.append({"job_id": job.job_id, **result})
                    print(f"rsd eval (slurm): shard {shard} finished ({'failed' if 'error' in result else 'ok'}); "
                          f"{count - len(todo) + len(reports)} of {count} shards done", file=sys.stderr)
                if pending:
                    time.sleep(options.poll_s)
        except KeyboardInterrupt:
            for job in pending.values():
                job.cancel(check=False)
            print(f"rsd eval (slurm): interrupted; the {len(pending)} running shards were cancelled. Rerun the same "
                  f"command to continue (finished shards are kept).", file=sys.stderr)
            return 130
        write_json_atomic(out / JOBS_DIR / "jobs.json", sorted(reports, key=lambda r: r["shard"]["index"]))
    summary = merge_runs(out, [c.out for c in configs], command=config.command, plot=config.plot,
                         also_allowed=(SHARDS_DIR, JOBS_DIR))
    code = report(summary, out, allow_missing=False)
    errored = [r for r in reports if r.get("exit_code") not in (None, 0)]
    if failed:
        print("rsd eval (slurm): these shards' jobs failed (rerun the same command to continue them):\n  "
              + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed or errored else code

"""Evaluate a policy on LIBERO with the OpenVLA-OFT protocol; results survive kills and resume exactly.

Protocol (``rsd.sim.protocol``; the loop is ``rsd.sim.episode``): one env per task (``env.seed(0)``); trial i
starts from the task's init state i; 10 settle steps with the dummy action (no frames kept); then up to the
suite's max steps, the policy queried only when the open-loop action queue is empty; success is the ``done`` flag
that ``env.step`` returns (``info['success']`` is never read). Before every episode ``random``, ``numpy`` and
``torch`` are seeded with ``--seed`` (7), so an episode's outcome does not depend on which episodes ran
before it or in which worker process (OpenVLA-OFT seeds once per run; per-episode seeding is what makes
``--workers`` and ``--resume`` reproduce a serial, uninterrupted run).

Files in ``--out DIR`` (a new or empty directory, or one holding rsd eval's ``run.json``: any other existing
directory, whose ``summary.json`` etc. would be overwritten, is refused; so is an empty ``--out``):
- ``episodes.jsonl``: one JSON line per finished episode, appended by the parent process only, each as a
  single ``write`` of the whole line + flush + fsync, under an exclusive lock on ``DIR/.lock`` (``rsd.filelock``:
  a second eval of the same DIR is refused, naming the holder). A killed eval loses at most the episodes in
  flight; ``--resume`` skips every (task, trial) already recorded.
- ``run.json``: what the episodes depend on (suite, seed, render, camera size, protocol, ``fast``, the device,
  whether an OpenVLA-OFT model sees centre-cropped images (``--no-center-crop``),
  and what stands behind ``--policy``: its kind, statistics key and a content hash of its files,
  ``rsd.policy.factory.policy_identity``; the ``--policy`` text itself is kept for reading only, so the same
  policy named by a relative or an absolute path resumes). ``--resume`` refuses a difference with
  :class:`ResumeMismatchError` naming it (a ``run.json`` written before ``--fast`` existed reads as
  ``fast: false``; one without the policy hash or device cannot be resumed). It is written once the start
  succeeded (the policy loaded in this process, or the first worker is ready) and before the first episode is
  recorded, so a failed start leaves none; a ``run.json`` with no episode recorded binds nothing.
- ``summary.json`` / ``summary.png``: per-task and overall success with Wilson 95 % intervals, mean steps,
  policy latency per chunk (p50/p90), versions, renderer, seed, date, command; the same table is printed.
- ``videos/``: one mp4 per episode (rotated 256 px agentview, 30 fps), all or failures only.

An exception anywhere in an episode (policy or env) records that episode with its error, stops the eval,
writes the summary and exits 1: nothing fails silently. ``--resume`` re-runs errored episodes; the summary
counts each (task, trial) once, from its last record.

``--fast`` runs a learned policy on rsd's CUDA fast path (``rsd.policy.factory``): a backbone with one
(OpenVLA-OFT) compiled and replayed through CUDA graphs, a greedy RSD policy's heads + argmax + detokenize
as one compiled CUDA graph; a speculative RSD policy keeps its speculative decoder (only its backbone gets
faster). Actions match the eager policy's within each part's tolerance (bf16 rounding, argmax ties), the
latencies do not, so ``fast`` is recorded in ``run.json`` and ``summary.json`` and ``--resume`` needs the same
value. A scripted policy, a non-CUDA device or a policy with nothing on a fast path is a ConfigError.

``--decode {saved,greedy,exact,relaxed,match_rate}`` (``rsd.policy.decode``) chooses how a saved RSD policy decodes
(default: as saved), ``--threshold`` the acceptance threshold of ``relaxed`` (levels) / ``match_rate`` (fraction);
``--check-greedy`` (on by default for ``exact``) also decodes every chunk greedily and compares: for ``exact`` a
difference is a ``SpeculativeMismatchError`` (the episode errors, the eval exits 1), for ``relaxed``/``match_rate``
it is counted. All three are recorded in ``run.json`` (``--resume`` needs the same) and ``summary.json`` (``decode``).
Speculative policies add to each ``episodes.jsonl`` line and to every summary block a ``speculative`` record
(``rsd.eval.decoding``: chunks, mean accepted draft layers, per-layer acceptance, greedy-check counts); the
table shows them. ``scripts/compare_runs.py RUN_DIR...`` puts several runs side by side.

Beyond one process (docs/distributed-eval.md): ``--shard I/N`` runs the I-th of N disjoint slices of the requested
episodes (``rsd.eval.shards``; round-robin over the task-major list) into its own ``--out``, and ``rsd merge OUT
SHARD_DIR...`` combines the shards into one run with the same files. ``--backend ray`` runs the episodes on a Ray
cluster (``--address``), each env actor with its own copy of the policy, or with ``--policy-server`` all served in
batches by one policy actor (``rsd.eval.ray_batched``, on a GPU with ``--device cuda``); ``--backend slurm
--shards N`` submits the shards as a SLURM job array through submitit (``rsd.eval.slurm``; ``--slurm-executor local``
runs it on this machine), waits, and merges them into ``--out``; rerunning the same command continues it. ``--max-episodes`` then counts per shard.

``--backend batched`` (``rsd.eval.batched``, one host): ``--workers K`` env processes step LIBERO and send each
observation to this process, which holds the one learned policy (on the GPU by default) and answers them in batches
(one ``predict_chunks``, when every episode in progress has asked or ``--batch-window-ms`` has passed); a worker that
dies has its episode re-run on a fresh one, counted once. ``summary.json``'s ``batched`` block (printed at the end)
gives the batch sizes reached and the policy's latency per batch size.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from rsd.errors import ConfigError
from rsd.eval import slurm
from rsd.eval.evaluation import BACKENDS, EvalConfig, evaluate
from rsd.eval.rundir import check_out_dir
from rsd.eval.runners import VIDEO_MODES
from rsd.eval.shards import parse_shard
from rsd.policy.packaged import DEFAULT_POLICY
from rsd.policy.decode import DECODE_MODES
from rsd.sim import protocol

__all__ = ["HELP", "add_arguments", "run", "parse_task_ids"]

HELP = "evaluate a policy on LIBERO with the OpenVLA-OFT protocol"


def parse_task_ids(text: str | None) -> tuple[int, ...] | None:
    """``"0,3,5-7"`` -> ``(0, 3, 5, 6, 7)``; None -> None (all tasks)."""
    if text is None:
        return None
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                ids.extend(range(a, b + 1))
            else:
                ids.append(int(part))
        except ValueError as exc:
            raise ConfigError(f"--tasks takes task ids like '0,3,5-7', got {text!r}.") from exc
    if not ids:
        raise ConfigError(f"--tasks {text!r} selects no task.")
    return tuple(sorted(set(ids)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="libero_spatial", choices=protocol.SUITES)
    parser.add_argument("--policy", default=DEFAULT_POLICY,
                        help=f"{DEFAULT_POLICY} (default: the packaged low-dimensional RSD policy), lowdim-l1 (its L1 "
                             "sibling), expert, expert-rfsq[:DIR] (scripted oracles), openvla-oft:PATH, or a directory "
                             "saved by "
                             "RSDPolicy/L1Policy (rsd.policy.factory). openvla-oft:PATH must be fine-tuned for "
                             "--suite; openvla-oft:PATH@UNNORM_KEY is the deliberate override: it runs the checkpoint "
                             "on --suite with the statistics dataset_statistics.json[UNNORM_KEY], guard rails off "
                             "when UNNORM_KEY is another dataset's (recorded in run.json)")
    parser.add_argument("--trials", type=int, default=protocol.NUM_TRIALS_PER_TASK,
                        help="trials per task; trial i starts from init state i (default 50)")
    parser.add_argument("--tasks", default=None, help="task ids, e.g. '0,3' or '0-4' (default: all)")
    parser.add_argument("--workers", type=int, default=1,
                        help="episodes run in this many spawned processes (--backend batched: env processes, the "
                             "policy stays in this one)")
    parser.add_argument("--video", choices=VIDEO_MODES, default=None,
                        help="mp4 per episode: all, failures (default when rendering) or none")
    parser.add_argument("--render", action=argparse.BooleanOptionalAction, default=None,
                        help="render camera images (policies that see images need it; --no-render is ~10x faster). "
                             "Default: render, except for a policy that reads no images (the low-dimensional ones) "
                             "when no --video is asked for")
    parser.add_argument("--out", required=True,
                        help="results directory: a new or empty one, or an earlier rsd eval's (with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the eval recorded in --out")
    parser.add_argument("--seed", type=int, default=protocol.SEED)
    parser.add_argument("--camera-size", type=int, default=protocol.CAMERA_SIZE)
    parser.add_argument("--max-episodes", type=int, default=None, help="stop after this many new episodes")
    parser.add_argument("--device", default=None, help="device of learned policies (default: cuda if available)")
    parser.add_argument("--fast", action="store_true",
                        help="learned policies on rsd's CUDA fast path: a backbone with one (OpenVLA-OFT) compiled "
                             "+ CUDA graphs; a greedy RSD policy's heads+argmax+detokenize as one compiled CUDA "
                             "graph (codes = eager argmax up to float ties); a speculative RSD policy keeps its "
                             "decoder, only its backbone is sped up. Needs a CUDA --device and a learned policy "
                             "(error otherwise); recorded in run.json, --resume needs the same value")
    parser.add_argument("--decode", choices=DECODE_MODES, default="saved",
                        help="how a saved RSD policy decodes: saved (as saved; default), greedy (RFSQ head alone), "
                             "exact / relaxed / match_rate (speculative with its draft head and that acceptance rule). "
                             "Anything but saved needs an RSD policy directory; recorded in run.json, --resume needs "
                             "the same")
    parser.add_argument("--threshold", type=_number, default=None,
                        help="acceptance threshold of --decode relaxed (levels, an int >= 0; needed) or match_rate "
                             "(fraction of equal tokens in [0, 1]; default 0.7); refused for other modes")
    parser.add_argument("--check-greedy", action=argparse.BooleanOptionalAction, default=None,
                        help="also decode every chunk greedily and compare the codes (default on for --decode exact, "
                             "where a difference is a SpeculativeMismatchError; relaxed/match_rate count differences). "
                             "Its time is inside the policy latency; the summary also gives the latency without it")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a saved policy's backbone run its checkpoint's own Python code when its "
                             "policy.json asks for it (refused without this flag)")
    parser.add_argument("--no-center-crop", dest="center_crop", action="store_false",
                        help="openvla-oft:PATH only: feed the model uncropped images. OpenVLA-OFT's LIBERO checkpoints "
                             "were trained with random-crop augmentation and are evaluated with a 0.9-area centre "
                             "crop of both views (the default); use this only for a checkpoint trained without it. "
                             "Recorded in run.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only shard I of N (0-based) of the requested episodes: those at positions p with "
                             "p %% N == I of the task-major list (every shard gets a similar mix of tasks). Each shard "
                             "runs into its own --out (recorded in run.json with the whole request; --resume refuses "
                             "another shard); combine them with rsd merge OUT SHARD_DIR...")
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="who runs the episodes: local (this process, or --workers spawned processes, each with "
                             "its own copy of the policy; default), batched (--workers env processes step LIBERO and "
                             "this process holds the one policy, e.g. on the GPU, answering their requests in batches: "
                             "a learned policy only; the policy server's batch sizes and latencies go into "
                             "summary.json's `batched` block and are printed at the end), ray (a Ray cluster, "
                             "--address; --workers Ray workers), slurm (a SLURM job array of --shards N shards through "
                             "submitit, merged into --out; see the options below). Recorded in run.json; --resume may "
                             "use another backend (the results are the same files)")
    parser.add_argument("--batch-window-ms", type=float, default=None, metavar="MS",
                        help="--backend batched or ray --policy-server: how long the policy server waits, after the "
                             "first request of a "
                             "batch, for the env workers still stepping their env (default "
                             "rsd.eval.batched.DEFAULT_WINDOW_MS = 5 ms; a batch goes as soon as every worker in the "
                             "middle of an episode has asked)")
    parser.add_argument("--batch-pad", action="store_true",
                        help="--backend batched only: pad every batch to one row per env worker, each worker at its "
                             "own row, so that an episode's chunks do not depend on which other workers asked at the "
                             "same time (a GPU's batched kernels round differently for other batch shapes, and the "
                             "simulator amplifies that into different episodes); costs the latency of full batches "
                             "(docs/batched-eval.md)")
    parser.add_argument("--policy-server", action="store_true",
                        help="--backend ray only: one Ray actor holds the policy (a whole GPU with --device cuda) and "
                             "serves every env actor's chunks in batches, as --backend batched does on one host "
                             "(a learned policy only; --batch-window-ms applies; its batch sizes and latencies go "
                             "into summary.json's `batched` block). Without it every env actor runs its own copy")
    parser.add_argument("--address", default=None,
                        help="--backend ray only: the address of the Ray cluster to run on (handed to "
                             "rsd.eval.ray_backend.RayRunner; docs/distributed-eval.md)")
    slurm.add_arguments(parser)


def _number(text: str) -> int | float:
    """``--threshold``: an int when the text is one (relaxed counts levels), else a float."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _resolve_tasks(suite: str, tasks: tuple[int, ...] | None, trials: int) -> list[int]:
    from rsd.sim.libero import list_tasks, load_init_state_file

    specs = list_tasks(suite)
    ids = list(range(len(specs))) if tasks is None else list(tasks)
    bad = [t for t in ids if not 0 <= t < len(specs)]
    if bad:
        raise ConfigError(f"--tasks {bad} out of range: {suite} has tasks 0-{len(specs) - 1}.")
    for t in ids:
        n = load_init_state_file(specs[t].init_states_file).shape[0]
        if trials > n:
            raise ConfigError(f"--trials {trials} exceeds the {n} init states of {suite} task {t}.")
    return ids


def run(args: argparse.Namespace) -> int:
    from rsd.policy.identity import reads_images
    from rsd.policy.packaged import resolve_packaged

    env = slurm.submitting_env()  # as the user set it: before anything here sets LIBERO up
    slurm_options = slurm.options_from_args(args)
    shard = None if args.shard is None else parse_shard(args.shard)
    if shard is not None and slurm_options is not None:
        raise ConfigError("--shard runs one shard by hand; --backend slurm makes the shards itself (--shards N): "
                          "drop one of them.")

    args.policy = resolve_packaged(args.policy)
    if args.render is None:
        args.render = args.video not in (None, "none") or reads_images(args.policy)
    video = args.video if args.video is not None else ("failures" if args.render else "none")
    config = EvalConfig(suite=args.suite, policy=args.policy, out=args.out, trials=args.trials,
                        tasks=parse_task_ids(args.tasks), workers=args.workers, video=video, render=args.render,
                        resume=args.resume, seed=args.seed, camera_size=args.camera_size,
                        max_episodes=args.max_episodes, command=shlex.join(["rsd", *sys.argv[1:]]),
                        progress=not args.no_progress, device=args.device, fast=args.fast,
                        trust_remote_code=args.trust_remote_code, center_crop=args.center_crop,
                        decode=args.decode, threshold=args.threshold, check_greedy=args.check_greedy,
                        shard=shard, backend=args.backend, address=args.address,
                        batch_window_ms=args.batch_window_ms, batch_pad=args.batch_pad,
                        policy_server=args.policy_server)
    if slurm_options is not None:
        slurm.check_out(config.out, slurm_options.shards)  # before LIBERO is imported to resolve the tasks
        task_ids = _resolve_tasks(config.suite, config.tasks, config.trials)
        return slurm.run_slurm(config, task_ids, slurm_options, env)
    check_out_dir(config.out)  # before LIBERO is imported to resolve the tasks
    task_ids = _resolve_tasks(config.suite, config.tasks, config.trials)
    return evaluate(config, task_ids).exit_code

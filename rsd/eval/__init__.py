"""``rsd eval``: evaluate a policy on LIBERO with the OpenVLA-OFT protocol (the command's options: ``rsd.eval.cli``).

One concept per module:

- ``rsd.eval.records``     ``EpisodeKey``, ``EpisodeResult`` (one line of ``episodes.jsonl``), ``ResultsFile``
- ``rsd.eval.rundir``      the results directory: which ``--out`` may be written, ``run.json``, its ``--resume`` check
- ``rsd.eval.runners``     who runs the episodes: ``SerialRunner``, ``ParallelRunner`` (spawned workers),
  ``EpisodeWorker``, ``VideoSink``
- ``rsd.eval.report``      ``summarize``, ``format_table``, ``summary.png``, versions and renderer
- ``rsd.eval.decoding``    how an RSD policy decoded: per-episode ``SpecTally``, ``RecordingPolicy``, ``summarize_spec``
- ``rsd.eval.compare``     several runs side by side from their ``summary.json`` (``scripts/compare_runs.py``)
- ``rsd.eval.evaluation``  ``EvalConfig`` (the settings, checked) and ``evaluate`` (one run, lock to summary)
- ``rsd.eval.shards``      ``--shard i/N``: a deterministic, disjoint slice of the requested episodes
- ``rsd.eval.merge``       ``rsd merge OUT SHARD_DIR...``: shard runs into one run, gaps listed
- ``rsd.eval.slurm``       ``--backend slurm --shards N``: a submitit job array of shards, then the merge
- ``rsd.eval.ray_backend`` ``--backend ray``: ``RayRunner``, the episodes in Ray actors (a killed one's episode re-run)
- ``rsd.eval.ray_batched`` ``--backend ray --policy-server``: one policy actor serving the env actors in batches
- ``rsd.eval.batched``     ``--backend batched``: ``BatchedRunner``, env worker processes and one policy in this process
  serving their chunks in batches (``predict_chunks``; a killed worker's episode re-run)
- ``rsd.eval.cli``         the ``rsd eval`` options and ``run(args)``

The episode loop itself is ``rsd.sim.episode`` (``run_episode``, shared with ``rsd collect``); it is re-exported
here, as are the public names above, so ``from rsd.eval import evaluate, EvalConfig, run_episode`` works.
"""

from __future__ import annotations

from rsd.eval.cli import HELP, add_arguments, parse_task_ids, run
from rsd.eval.evaluation import EvalConfig, EvalOutcome, episode_keys, evaluate
from rsd.eval.records import EpisodeKey, EpisodeResult, ResultsFile, latest_by_key
from rsd.eval.report import format_table, summarize
from rsd.eval.rundir import LOCK_NAME, PLOT_NAME, RESULTS_NAME, RUN_NAME, SUMMARY_NAME, is_run_dir
from rsd.eval.runners import VIDEO_DIR, VIDEO_MODES
from rsd.limits import check_seed
from rsd.sim.episode import EpisodeOutcome, run_episode, seed_everything

__all__ = [
    "HELP", "add_arguments", "run",
    "EvalConfig", "EvalOutcome", "EpisodeKey", "EpisodeResult", "EpisodeOutcome", "ResultsFile",
    "evaluate", "episode_keys", "latest_by_key", "run_episode", "seed_everything", "summarize", "format_table",
    "parse_task_ids", "check_seed", "is_run_dir",
    "RESULTS_NAME", "RUN_NAME", "SUMMARY_NAME", "PLOT_NAME", "LOCK_NAME", "VIDEO_DIR", "VIDEO_MODES",
]

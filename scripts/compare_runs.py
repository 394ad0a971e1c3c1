"""Compare rsd eval runs side by side from their summary.json: one row per run (policy, --decode, suite, n,
successes, success rate with its Wilson 95 % interval, policy latency p50/p90, mean accepted draft layers, greedy-check
mismatches, the command); --per-task adds one row per task; --markdown FILE also writes the tables as Markdown;
--plot FILE draws the success rate per task and overall as a PNG (one bar per run with its Wilson interval, one
subplot per suite), the runs named by --labels A,B,... (default: the directory names). A directory without
summary.json is refused (exit 1), as are --labels that do not give one label per run. The logic is rsd.eval.compare.

    .venv/bin/python scripts/compare_runs.py results/l1 results/greedy results/exact results/relaxed1 --per-task \\
        --markdown results/compare.md --plot results/compare.png --labels L1,greedy,exact,relaxed1
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from rsd.eval.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

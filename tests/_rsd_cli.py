"""``rsd <command>`` in a subprocess from the repository root, one thread per process (the sim tests' way of
running the CLI as a user would)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_rsd(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rsd.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)

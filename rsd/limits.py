"""Limits of a run's settings that do not depend on a policy: the seed range, CPU cores and memory for workers.

Used by ``rsd eval`` (``EvalConfig``) and ``rsd collect`` before anything is loaded or written.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rsd.errors import ConfigError

__all__ = ["SEED_MAX", "WORKER_MEMORY_BYTES", "check_seed", "usable_cores", "mem_available_bytes",
           "check_workers", "warn_worker_memory"]

SEED_MAX = 2**32 - 1  # numpy's seed range
WORKER_MEMORY_BYTES = int(1.5 * 2**30)  # one eval worker: LIBERO env + MuJoCo + policy, about 1.5 GB


def check_seed(seed: Any) -> None:
    """ConfigError unless ``seed`` is an int in ``[0, 2**32 - 1]`` (what numpy, torch and random all take)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"--seed must be an int in [0, {SEED_MAX}] (numpy's seed range), got {seed!r}.")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def mem_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is no such file: not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # allowed: no /proc/meminfo (not Linux): the memory warning is skipped, nothing else
        return None
    return None


def check_workers(workers: int) -> None:
    """ConfigError for fewer than 1 worker or more workers than :func:`usable_cores`."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}.")
    cores = usable_cores()
    if workers > cores:
        raise ConfigError(f"--workers {workers} exceeds the {cores} CPU cores this process may use: each worker is a "
                          f"process with its own LIBERO env and policy (about 1.5 GB of memory) and more workers "
                          f"than cores only share them. Pass --workers {cores} or fewer.")


def warn_worker_memory(workers: int) -> None:
    """A stderr warning when ``workers`` eval workers (about 1.5 GB each) need more than the available memory."""
    available = mem_available_bytes()
    need = workers * WORKER_MEMORY_BYTES
    if available is not None and need > available:
        print(f"rsd eval: warning: --workers {workers} needs about {need / 2**30:.1f} GB (1.5 GB a worker) and "
              f"{available / 2**30:.1f} GB are available: the machine may swap or kill workers; pass "
              f"--workers {max(1, available // WORKER_MEMORY_BYTES)} or fewer.", file=sys.stderr)

"""One writer per output: an exclusive, non-blocking ``flock`` on a lock file that names its holder.

``rsd eval`` locks ``DIR/.lock`` for the whole eval; ``rsd collect`` locks ``<file>.lock`` next to the HDF5
file it writes. The holder writes one line into the lock file (pid, host, start time, command) after taking
the lock, so a second writer is refused with :class:`OutputLockedError` saying who holds it. Closing the file
descriptor releases the lock (also when the holder is killed); the lock file itself stays (deleting it would
let a third process lock a fresh file while a second still waits on the old one).

``flock`` locks conflict between open file descriptions, so two writers in one process are refused too. On
NFS, Linux maps ``flock`` onto the server's byte-range locks (locks across machines hold as well).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Iterator

from rsd.errors import ConfigError, OutputLockedError

__all__ = ["exclusive_lock", "holder_line"]


def holder_line() -> str:
    """``pid 123 on host, since 2026-11-26T10:00:00+00:00: rsd eval ...`` (what the lock file holds)."""
    since = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}, since {since}: {shlex.join(sys.argv) or '?'}"


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    return text or "a process that has not written its name yet"


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path, *, what: str, fix: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` for the ``with`` block, or raise :class:`OutputLockedError`.

    ``what`` names the output (``"rsd eval is writing runs/x"``), ``fix`` what the refused user should do.
    An OSError opening the lock file (no permission, not a directory) is a :class:`ConfigError`.
    """
    lock_path = Path(lock_path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot create the lock file {lock_path} ({exc.strerror}): {fix}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OutputLockedError(f"{what}, but {lock_path} is locked by another writer ({_read_holder(fd)}); "
                                    f"{fix}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder_line() + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock

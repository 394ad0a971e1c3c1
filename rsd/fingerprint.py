"""Content hashes of what stands behind a policy name: ``sha256:<hex>`` over files, independent of where the
files are and how their path was written.

A tree hash covers every regular file below a directory (symlinks to files are followed, as a loader would):
for each file in sorted relative POSIX path order, its path, its size and its bytes, each length-prefixed so
that no two trees hash alike by concatenation. Every byte is read; a 15 GB checkpoint takes tens of seconds,
which ``rsd eval`` pays once per invocation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

__all__ = ["tree_files", "hash_tree", "hash_file_list", "file_sha256"]

_BLOCK = 1 << 20


def tree_files(directory: str | Path, *, keep: Callable[[Path], bool] | None = None) -> list[Path]:
    """Regular files below ``directory`` (relative paths, sorted), those for which ``keep(relative)`` is true."""
    directory = Path(directory)
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file():
                rel = path.relative_to(directory)
                if keep is None or keep(rel):
                    found.append(rel)
    return sorted(found, key=lambda p: p.as_posix())


def hash_file_list(root: str | Path, relative: list[Path]) -> str:
    """``sha256:<hex>`` of the files ``root / rel`` for ``rel`` in the given order (see the module docstring)."""
    root = Path(root)
    digest = hashlib.sha256()
    for rel in relative:
        name = rel.as_posix().encode()
        path = root / rel
        digest.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def hash_tree(directory: str | Path, *, keep: Callable[[Path], bool] | None = None) -> str:
    """``sha256:<hex>`` of every file below ``directory`` that ``keep`` accepts (all by default)."""
    return hash_file_list(directory, tree_files(directory, keep=keep))


def file_sha256(path: str | Path) -> str:
    """The plain SHA-256 hex digest of one file's bytes (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()

"""`rsd collect`'s DemoWriter: one writer per file (a second is refused naming the holder, whether or not HDF5's
own locking works: it is often off on NFS / Lustre), and the file appears only complete, fsynced, by rename."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from rsd import errors
from rsd.errors import ConfigError
from rsd.sim.demos import DemoWriter, read_demos

pytest.importorskip("h5py", reason="h5py is required (install rsd[sim])")

INFO = {"problem_name": "p", "domain_name": "robosuite", "language_instruction": "put the bowl on the plate"}


def _demo(seed: int, T: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    return dict(actions=rng.uniform(-1, 1, size=(T, 7)), obs={"ee_pos": rng.normal(size=(T, 3))},
                states=rng.normal(size=(T, 5)), robot_states=rng.normal(size=(T, 9)), problem_info=INFO)


@pytest.fixture(autouse=True)
def hdf5_locking_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on NFS / Lustre mounts: HDF5's file locking does not protect the file."""
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")


def test_a_second_writer_of_the_same_file_is_refused_naming_the_first(tmp_path: Path) -> None:
    path = tmp_path / "demos.hdf5"
    first = DemoWriter(path)
    first.add(**_demo(0))
    with pytest.raises(ConfigError, match=rf"locked by another writer \(pid {os.getpid()} on .*\)") as info:
        DemoWriter(path)
    assert isinstance(info.value, errors.OutputLockedError)
    first.add(**_demo(1))
    first.close()
    assert [d.name for d in read_demos(path)] == ["demo_0", "demo_1"]  # no demo lost to the second writer


def test_the_lock_is_released_when_a_writer_ends(tmp_path: Path) -> None:
    path = tmp_path / "demos.hdf5"
    aborted = DemoWriter(path)
    aborted.abort()
    with DemoWriter(path) as writer:  # not locked any more
        writer.add(**_demo(0))
    with pytest.raises(ConfigError, match="exists"):  # a finished file is never appended to or replaced
        DemoWriter(path)
    with DemoWriter(path, overwrite=True) as writer:
        writer.add(**_demo(2))
    assert len(read_demos(path)) == 1


def test_the_file_appears_complete_and_fsynced_by_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "demos.hdf5"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with DemoWriter(path) as writer:
        writer.add(**_demo(0))
        assert not path.exists()  # nothing at the final name until the file is complete
    assert path.is_file()
    assert str(path.with_name(path.name + ".partial")) in synced  # its bytes reach the disk before the rename
    assert str(tmp_path) in synced  # and the rename itself


def test_a_writer_into_an_unwritable_place_is_a_typed_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="choose an --out you can write to"):
        DemoWriter(blocker / "demos.hdf5")

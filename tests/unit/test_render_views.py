"""The views files of ``rsd render-demos`` (``rsd.train.render_views``) without LIBERO: where they live, what reading
them refuses (missing, another version of the demo file, another size), and ``--amp`` outside CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rsd.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from rsd.train.render_views import _ViewsWriter, read_views, views_path

pytestmark = pytest.mark.unit


def _views(demo_file: Path, size: int, steps: int = 3) -> np.ndarray:
    views = np.random.default_rng(0).integers(0, 256, (steps, 2, size, size, 3), dtype=np.uint8)
    writer = _ViewsWriter(demo_file, size, camera_size=256, command="test")
    writer.add("demo_0", views, deviation=0.0)
    assert writer.finish() == views_path(demo_file, size)
    return views


def test_views_file_beside_the_demos_round_trips(tmp_path: Path) -> None:
    demo_file = tmp_path / "spatial.hdf5"
    demo_file.write_bytes(b"demo bytes")
    assert views_path(demo_file, 128) == tmp_path / "spatial.views128.hdf5"
    views = _views(demo_file, 16)
    np.testing.assert_array_equal(next(read_views(demo_file, ["demo_0"], 16)), views)
    assert not list(tmp_path.glob("*.partial"))


def test_missing_changed_or_resized_views_are_refused(tmp_path: Path) -> None:
    demo_file = tmp_path / "object.hdf5"
    demo_file.write_bytes(b"demo bytes")
    with pytest.raises(CheckpointNotFoundError, match="rsd render-demos"):
        next(read_views(demo_file, ["demo_0"], 16))
    _views(demo_file, 16)
    with pytest.raises(CheckpointMismatchError, match="no views of .'demo_7'"):
        next(read_views(demo_file, ["demo_7"], 16))
    with pytest.raises(CheckpointNotFoundError):  # another size: another file
        next(read_views(demo_file, ["demo_0"], 32))
    demo_file.write_bytes(b"demo bytes, recorded again")
    with pytest.raises(CheckpointMismatchError, match="another version"):
        next(read_views(demo_file, ["demo_0"], 16))


def test_amp_is_for_cuda_only() -> None:
    from rsd.train.policy import TrainConfig

    with pytest.raises(ConfigError, match="CUDA"):
        TrainConfig(amp=True, device="cpu")
    assert TrainConfig(amp=True, device="cuda").amp

"""`--workers` is capped at the CPU cores and warns when the workers' memory (about 1.5 GB each) exceeds what is
available; LIBERO's config.yaml under RSD_HOME is readable by a second user sharing it (0644, directory 0755)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from rsd import eval as ev
from rsd.errors import ConfigError
from rsd.sim import libero
from tests._eval_stubs import capture_policy_factories


def _config(out: Path, workers: int) -> ev.EvalConfig:
    return ev.EvalConfig(suite="libero_spatial", policy="expert", out=out, trials=1, workers=workers, render=False,
                         video="none", progress=False, plot=False)


def test_more_workers_than_cores_is_refused(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=rf"--workers {cores + 1} exceeds the {cores} CPU cores.*--workers {cores}"):
        _config(tmp_path, cores + 1)
    _config(tmp_path, cores)


def test_workers_beyond_the_available_memory_warn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from rsd import limits

    monkeypatch.setattr(limits, "usable_cores", lambda: 16)
    monkeypatch.setattr(limits, "mem_available_bytes", lambda: 4 * 2**30)  # 4 GB free: two workers fit, not four
    capture_policy_factories(monkeypatch)
    ev.evaluate(_config(tmp_path / "two", 2), [0])
    assert "warning" not in capsys.readouterr().err
    ev.evaluate(_config(tmp_path / "four", 4), [0])
    err = capsys.readouterr().err
    assert "warning: --workers 4 needs about 6.0 GB" in err and "4.0 GB are available" in err
    assert "--workers 2 or fewer" in err


def test_meminfo_is_read() -> None:
    from rsd import limits

    available = limits.mem_available_bytes()
    assert available is None or available > 0


def test_libero_config_is_readable_by_other_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSD_HOME", str(tmp_path / "shared" / "rsd"))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", "")  # ensure_libero_config sets it; restored after the test
    config_dir = libero.ensure_libero_config()
    config_file = config_dir / "config.yaml"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o644
    for directory in (config_dir, config_dir.parent, config_dir.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
    assert set(yaml.safe_load(config_file.read_text())) == {"benchmark_root", "bddl_files", "init_states",
                                                            "datasets", "assets"}


def test_an_owner_only_config_from_an_older_rsd_is_opened_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A current config.yaml left 0600 by an older rsd is made 0644 without being rewritten."""
    monkeypatch.setenv("RSD_HOME", str(tmp_path / "rsd"))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", "")
    config_file = libero.ensure_libero_config() / "config.yaml"
    config_file.chmod(0o600)
    before = config_file.stat().st_ino
    libero.ensure_libero_config()
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o644 and config_file.stat().st_ino == before

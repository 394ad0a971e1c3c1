"""`rsd info`: reports versions, and degrades to a report (not a crash) when LIBERO or GL is missing."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from rsd import info
from rsd.errors import RendererUnavailableError, SimSetupError
from rsd.sim import setup as sim_setup

pytestmark = pytest.mark.unit


def _args(**kw: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    info.add_arguments(parser)
    ns = parser.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.fixture
def no_sim(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without LIBERO and without any GL backend (nothing is probed or imported)."""
    def missing() -> None:
        raise SimSetupError("LIBERO is not installed (no `libero` package): run `bash scripts/setup.sh`")

    def no_gl(use_cache: bool = True) -> None:
        raise RendererUnavailableError("no headless OpenGL backend works (egl: exit 1)")

    monkeypatch.setattr(sim_setup, "libero_package_root", missing)
    monkeypatch.setattr(sim_setup, "select_renderer", no_gl)
    monkeypatch.setattr(info, "_devices", lambda: {"devices": ["cpu"], "cuda_available": False})
    monkeypatch.setattr(info, "_PACKAGES", info._PACKAGES + (("rsd-no-such-dist", "ghost"),))


def test_info_without_libero_reports_and_check_fails(no_sim: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert info.run(_args(json=True)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["ghost"] == info.NOT_INSTALLED
    assert report["versions"]["rsd"] == "0.1.0" and report["versions"]["python"].count(".") == 2
    assert report["libero"]["ok"] is False
    assert "setup.sh" in report["libero"]["error"]
    assert report["renderer"]["ok"] is False and "OpenGL" in report["renderer"]["error"]
    assert info.run(_args(check=True)) == 1
    out = capsys.readouterr()
    assert "NOT READY" in out.out and "NOT WORKING" in out.out and "setup.sh" in out.err


def test_info_reports_the_chosen_renderer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    chosen = sim_setup.RendererInfo("egl", True, "cache", "Mesa/X.org", "llvmpipe", "4.5")
    monkeypatch.setattr(sim_setup, "select_renderer", lambda use_cache=True: chosen)
    monkeypatch.setattr(info, "_libero", lambda: {"ok": True, "package": "/x", "assets": "/x/assets", "config": "/c"})
    monkeypatch.setattr(info, "_devices", lambda: {"devices": ["cpu"], "cuda_available": False})
    assert info.run(_args(check=True)) == 0
    out = capsys.readouterr().out
    assert "MUJOCO_GL=egl (cache)" in out and "llvmpipe" in out


def test_select_renderer_falls_back_caches_and_names_the_fix(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EGL fails, OSMesa works: OSMesa is chosen, exported and cached; with neither, the error says what to do."""
    monkeypatch.setenv("RSD_HOME", str(tmp_path))
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    monkeypatch.setattr(sim_setup, "_SELECTED", None)
    probed: list[str] = []

    def fake_probe(backend: str, timeout_s: float = 120.0) -> sim_setup.RendererInfo:
        probed.append(backend)
        if backend == "osmesa" and works:
            return sim_setup.RendererInfo("osmesa", True, "probe", "Mesa", "llvmpipe", "4.5")
        return sim_setup.RendererInfo(backend, False, "probe", error="libEGL.so.1: cannot open")

    monkeypatch.setattr(sim_setup, "probe_renderer", fake_probe)
    works = False
    with pytest.raises(RendererUnavailableError, match="apt-get install"):
        sim_setup.select_renderer()
    assert probed == ["egl", "osmesa"] and not (tmp_path / "renderer.json").exists()  # failures are not cached

    works = True
    chosen = sim_setup.select_renderer()
    assert chosen.backend == "osmesa" and os.environ["MUJOCO_GL"] == os.environ["PYOPENGL_PLATFORM"] == "osmesa"
    monkeypatch.setattr(sim_setup, "_SELECTED", None)  # as in a new process
    monkeypatch.delenv("MUJOCO_GL")
    probed.clear()
    again = sim_setup.select_renderer()
    assert probed == [] and again.source == "cache" and again.backend == "osmesa"

    monkeypatch.setattr(sim_setup, "_SELECTED", None)
    monkeypatch.setenv("MUJOCO_GL", "egl")  # a preset MUJOCO_GL is respected, not probed
    assert sim_setup.select_renderer().source == "env" and probed == []


def test_describe_renderer_probes_a_preset_backend_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """MUJOCO_GL set by the user: the backend is kept as is, and its GL vendor / renderer come from one probe (what
    rsd eval's summary records: a pixel policy's inputs differ between renderers)."""
    from rsd.eval.report import renderer_record

    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setattr(sim_setup, "_SELECTED", None)
    monkeypatch.setattr(sim_setup, "_DESCRIBED", None)
    probed: list[str] = []

    def fake_probe(backend: str, timeout_s: float = 120.0) -> sim_setup.RendererInfo:
        probed.append(backend)
        return sim_setup.RendererInfo(backend, True, "probe", "NVIDIA Corporation", "NVIDIA H200/PCIe/SSE2", "4.6")

    monkeypatch.setattr(sim_setup, "probe_renderer", fake_probe)
    info1 = sim_setup.describe_renderer()
    assert (info1.backend, info1.source, info1.vendor) == ("egl", "env", "NVIDIA Corporation")
    assert renderer_record(True) == {"backend": "egl", "renderer": "NVIDIA H200/PCIe/SSE2",
                                     "vendor": "NVIDIA Corporation", "source": "env", "in_episodes": [],
                                     "mixed": False}  # no episodes given (tests/unit/test_eval_renderer.py)
    assert probed == ["egl"]  # once per process
    assert renderer_record(False) == {"backend": "none (--no-render)"}

    monkeypatch.setattr(sim_setup, "_DESCRIBED", None)
    monkeypatch.setattr(sim_setup, "probe_renderer", lambda backend, timeout_s=120.0: sim_setup.RendererInfo(
        backend, False, "probe", error="exit 1: libEGL.so.1: cannot open"))
    record = renderer_record(True)  # the probe failed: the backend in use is still said, with the probe's error
    assert record["backend"] == "egl" and record["vendor"] is None and "libEGL" in record["probe_error"]

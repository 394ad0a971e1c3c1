"""Which GL renderer the episodes came from: each worker records its own (``EpisodeResult.renderer``), the summary
lists the distinct ones (``renderer.in_episodes``) and flags a mix, and ``rsd merge`` recomputes that over the merged
episodes. A pixel policy's success depends on the renderer (docs/pixel-policy.md section 4), and on a Ray cluster the
process that writes the summary need not render anything itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from rsd import eval as ev
from rsd.eval import merge, runners
from rsd.eval.report import renderer_warning
from rsd.sim import setup as sim_setup
from tests._eval_stubs import FakeRunner
from tests._ray_world import FakeEnvWorker, Push, fake_settings

pytestmark = pytest.mark.unit

NVIDIA = "NVIDIA Corporation / NVIDIA H200/PCIe/SSE2"
MESA = "Mesa / llvmpipe (LLVM 19.1.7, 256 bits)"


@pytest.fixture
def egl_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary's own renderer description, without probing a GL context."""
    info = sim_setup.RendererInfo("egl", True, "env", "NVIDIA Corporation", "NVIDIA H200/PCIe/SSE2", "4.6")
    monkeypatch.setattr(sim_setup, "describe_renderer", lambda use_cache=True: info)


class RenderedBy(FakeRunner):
    """FakeRunner's episodes, rendered by ``renderers[trial % len(renderers)]``."""

    def __init__(self, renderers: Sequence[str]) -> None:
        super().__init__()
        self.renderers = renderers

    def results(self, keys: Sequence[ev.EpisodeKey]) -> Iterator[ev.EpisodeResult]:
        for r in super().results(keys):
            yield dataclasses.replace(r, renderer=self.renderers[r.trial % len(self.renderers)])


def _config(out: Path) -> ev.EvalConfig:
    return ev.EvalConfig(suite="libero_spatial", policy="expert", out=out, trials=4, render=True, video="none",
                         progress=False, plot=False)


def test_a_worker_records_its_renderer_once_and_only_when_rendering(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(runners, "gl_renderer", lambda: calls.append(1) or NVIDIA)
    rendered = FakeEnvWorker(dataclasses.replace(fake_settings(tmp_path), render=True), Push())
    keys = [ev.EpisodeKey("libero_spatial", t, i) for t in (0, 1) for i in range(2)]
    assert [rendered.run(k).renderer for k in keys] == [NVIDIA] * 4
    assert calls == [1]  # read after the first rendered episode; one process, one GL context
    unrendered = FakeEnvWorker(fake_settings(tmp_path), Push())
    assert unrendered.run(keys[0]).renderer is None and calls == [1]


def test_gl_renderer_says_unknown_and_why_without_a_gl_context(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_context() -> dict[str, str]:
        raise AttributeError("'NoneType' object has no attribute 'decode'")

    monkeypatch.setattr(sim_setup, "current_gl", no_context)
    assert runners.gl_renderer() == "unknown (AttributeError: 'NoneType' object has no attribute 'decode')"
    monkeypatch.setattr(sim_setup, "current_gl", lambda: {"vendor": "Mesa", "renderer": "llvmpipe"})
    assert runners.gl_renderer() == "Mesa / llvmpipe"


def test_the_summary_lists_the_renderers_of_the_episodes(tmp_path: Path, egl_here: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    outcome = ev.evaluate(_config(tmp_path / "one"), [0], runner=RenderedBy([NVIDIA]))
    record = outcome.summary["renderer"]
    assert record["vendor"] == "NVIDIA Corporation" and record["in_episodes"] == [NVIDIA]
    assert record["mixed"] is False and "WARNING" not in capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "one" / ev.RESULTS_NAME).read_text().splitlines()]
    assert {line["renderer"] for line in lines} == {NVIDIA}


def test_episodes_of_two_renderers_are_flagged_and_warned_about(tmp_path: Path, egl_here: None,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    outcome = ev.evaluate(_config(tmp_path / "mix"), [0], runner=RenderedBy([NVIDIA, MESA]))
    record = outcome.summary["renderer"]
    assert record["in_episodes"] == sorted([NVIDIA, MESA]) and record["mixed"] is True
    err = capsys.readouterr().err
    assert "WARNING: the episodes were rendered by 2 different GL renderers" in err and "llvmpipe" in err


def test_unrendered_runs_record_no_renderer(tmp_path: Path) -> None:
    config = ev.EvalConfig(suite="libero_spatial", policy="expert", out=tmp_path / "none", trials=4, render=False,
                           video="none", progress=False, plot=False)
    outcome = ev.evaluate(config, [0], runner=FakeRunner())
    assert outcome.summary["renderer"] == {"backend": "none (--no-render)"}


def test_merge_recomputes_the_renderers_over_the_merged_episodes() -> None:
    base = {"backend": "egl", "renderer": "NVIDIA H200/PCIe/SSE2", "vendor": "NVIDIA Corporation", "source": "env"}
    shard_a = {"renderer": {**base, "in_episodes": [NVIDIA], "mixed": False}}
    shard_b = {"renderer": {**base, "in_episodes": [MESA], "mixed": False}}
    records = [dataclasses.replace(r, renderer=NVIDIA if r.trial < 2 else MESA)
               for r in FakeRunner().results([ev.EpisodeKey("libero_spatial", 0, i) for i in range(4)])]
    merged = merge._merged_renderer([shard_a, shard_b], records, True)
    assert merged == {**base, "in_episodes": sorted([NVIDIA, MESA]), "mixed": True}
    assert "rendered by 2 different GL renderers" in renderer_warning(merged)  # what rsd merge prints
    alone = merge._merged_renderer([shard_a, shard_a], records[:2], True)
    assert alone["mixed"] is False and renderer_warning(alone) is None
    other_backend = {"renderer": {**base, "backend": "osmesa", "in_episodes": [MESA], "mixed": False}}
    assert isinstance(merge._merged_renderer([shard_a, other_backend], records, True), list)  # the distinct ones
    assert merge._merged_renderer([], records, False) == {"backend": "none (--no-render)"}

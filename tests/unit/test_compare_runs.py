"""``scripts/compare_runs.py`` (``rsd.eval.compare``): one row per run from summary.json, --per-task, --markdown,
--plot (one subplot per suite, --labels), and a directory without a summary refused."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from rsd import eval as ev
from rsd.errors import ConfigError
from rsd.eval import compare
from rsd.eval.decoding import SpecTally
from tests._eval_stubs import Succeeds
from tests.policy_factory import tiny_rsd_policy

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


class _Speculative:
    """Trial i succeeds when i is even; each episode decoded 4 chunks, 2 layers accepted in all, all checked."""

    def results(self, keys: Sequence[ev.EpisodeKey]) -> Iterator[ev.EpisodeResult]:
        for key in keys:
            spec = SpecTally(chunks=4, accepted_layers_sum=2, layer_accepted=(2, 0), layer_attempted=(4, 2),
                             greedy_checked=4, greedy_mismatched=key.trial % 2, greedy_check_ms=(0.5,) * 4)
            yield ev.EpisodeResult(suite=key.suite, task_id=key.task_id, task_name=f"task_{key.task_id}",
                                   instruction="i", trial=key.trial, init_state_index=key.trial,
                                   success=key.trial % 2 == 0, steps=30, error=None, latency_p50_ms=3.0,
                                   latency_p90_ms=4.0, chunk_latencies_ms=(3.0, 3.0, 4.0, 4.0), wall_s=0.1,
                                   video=None, seed=7, speculative=spec)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    policy = tiny_rsd_policy(speculative=True).save_pretrained(root / "policy")
    base = dict(suite="libero_spatial", trials=4, render=False, video="none", progress=False, plot=False)
    expert = ev.EvalConfig(policy="expert", out=root / "expert", command="rsd eval --policy expert", **base)
    ev.evaluate(expert, [0, 1], runner=Succeeds())
    exact = ev.EvalConfig(policy=str(policy), out=root / "exact", decode="exact", device="cpu",
                          command="rsd eval --policy P --decode exact", **base)
    ev.evaluate(exact, [0, 1], runner=_Speculative())
    return root / "expert", root / "exact"


def test_one_row_per_run_with_rate_interval_latency_and_decoding(runs: tuple[Path, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main([str(d) for d in runs]) == 0
    text = capsys.readouterr().out
    assert "expert" in text and "saved" in text and "rsd eval --policy expert" in text
    rows = compare.run_rows([compare.load_run(d) for d in runs])
    expert, exact = (dict(zip(compare.COLUMNS, r)) for r in rows)
    assert (expert["n"], expert["succ"], expert["rate"], expert["95% CI"]) == ("8", "8", "100.0%", "67.6-100.0")
    assert (expert["acc layers"], expert["greedy diff"]) == ("-", "-")
    assert exact["decode"] == "exact +check" and exact["command"] == "rsd eval --policy P --decode exact"
    assert (exact["n"], exact["succ"], exact["rate"]) == ("8", "4", "50.0%")
    assert exact["95% CI"] == "21.5-78.5"  # Wilson 95 % of 4/8
    assert (exact["p50 ms"], exact["p90 ms"]) == ("3.5", "4.0")
    assert (exact["acc layers"], exact["greedy diff"]) == ("0.50", "4/32")


def test_per_task_and_markdown(runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = tmp_path / "compare.md"
    assert compare.main([*map(str, runs), "--per-task", "--markdown", str(md)]) == 0
    text = capsys.readouterr().out
    assert "2/4 50.0%" in text and "4/4 100.0%" in text
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| run | policy | decode |") and lines[1].startswith("| --- |")
    assert any(x.startswith("| all |") for x in lines) and f"- run 2: {runs[1]}" in lines


def test_a_directory_without_summary_is_refused(runs: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert compare.main([str(runs[0]), str(tmp_path / "empty")]) == 1
    assert "has no summary.json" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="not an rsd eval summary"):
        compare.load_run(tmp_path / "other")


def test_the_script_runs(runs: tuple[Path, Path], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), *map(str, runs)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "exact +check" in done.stdout
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 1 and "no summary.json" in done.stderr


def _other_suite(run: Path, out: Path) -> Path:
    """A copy of ``run``'s summary.json, as if it had been run on libero_object."""
    out.mkdir()
    summary = json.loads((run / "summary.json").read_text())
    summary["suite"] = "libero_object"
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def test_per_task_tables_are_per_suite(runs: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    other = _other_suite(runs[1], tmp_path / "object")
    summary = json.loads((other / "summary.json").read_text())
    for block in summary["per_task"].values():
        block["name"] = "pick_up_the_ketchup"
    (other / "summary.json").write_text(json.dumps(summary))
    assert compare.main([str(runs[0]), str(other), "--per-task"]) == 0
    text = capsys.readouterr().out
    spatial, obj = text.split("libero_object:")  # task i of one suite is another task than task i of the other
    assert "libero_spatial:" in spatial and "pick_up_the_ketchup" not in spatial and "run 2  " not in spatial
    assert "pick_up_the_ketchup" in obj and "run 2" in obj.splitlines()[1] and "run 1" not in obj.splitlines()[1]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _bars(ax: Any) -> list[Any]:
    """One BarContainer per run (ax.containers also holds their error bars)."""
    from matplotlib.container import BarContainer
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_plot_per_task_one_bar_per_run_and_task_with_its_interval(runs: tuple[Path, Path], tmp_path: Path) -> None:
    loaded = [compare.load_run(d) for d in runs]
    fig = compare.plot_per_task(loaded, ["expert", "RSD exact"], tmp_path / "sub" / "plot.png")
    w, h = _png_size(tmp_path / "sub" / "plot.png")
    assert 600 <= w <= 3000 and 300 <= h <= 2000
    assert not list(tmp_path.glob("sub/*.partial.png"))
    (ax,) = fig.axes
    assert "libero_spatial" in ax.get_title() and ax.get_ylim() == (0, 100)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["expert", "RSD exact"]
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "all"
    bars = _bars(ax)  # tasks 0, 1 and all
    assert [[round(b.get_height(), 1) for b in c] for c in bars] == [[100.0] * 3, [50.0] * 3]
    ci = bars[1].errorbar.lines[2][0].get_segments()  # run 2's error bars
    assert [round(float(y), 1) for y in ci[0][:, 1]] == [15.0, 85.0]  # Wilson 95 % of 2/4
    assert [round(float(y), 1) for y in ci[2][:, 1]] == [21.5, 78.5]  # of 4/8, the "all" group


def test_plot_two_suites_two_subplots_same_label_same_colour(runs: tuple[Path, Path], tmp_path: Path) -> None:
    other = _other_suite(runs[1], tmp_path / "object")
    loaded = [compare.load_run(d) for d in (*runs, other)]
    fig = compare.plot_per_task(loaded, ["expert", "RSD", "RSD"], tmp_path / "plot.png")
    spatial, obj = fig.axes
    assert "libero_spatial" in spatial.get_title() and "libero_object" in obj.get_title()
    (expert, rsd), (rsd_object,) = _bars(spatial), _bars(obj)
    assert rsd[0].get_facecolor() == rsd_object[0].get_facecolor() != expert[0].get_facecolor()
    compare.plot_per_task(loaded[:1], ["expert"], tmp_path / "one.png")
    assert _png_size(tmp_path / "plot.png")[1] > _png_size(tmp_path / "one.png")[1]  # stacked vertically


def test_plot_refuses_wrong_labels_and_runs_without_tasks(runs: tuple[Path, Path], tmp_path: Path) -> None:
    loaded = [compare.load_run(d) for d in runs]
    with pytest.raises(ConfigError, match="2 runs"):
        compare.plot_per_task(loaded, ["only one"], tmp_path / "p.png")
    with pytest.raises(ConfigError, match="both labelled"):
        compare.plot_per_task(loaded, ["same", "same"], tmp_path / "p.png")
    with pytest.raises(ConfigError, match="no per_task"):
        compare.plot_per_task([loaded[0], {**loaded[1], "per_task": {}}], ["a", "b"], tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_plot_from_the_command_line(runs: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "per_task.png"
    other = _other_suite(runs[0], tmp_path / "object")
    assert compare.main([*map(str, runs), str(other), "--per-task", "--plot", str(png), "--labels", "E, X ,E"]) == 0
    assert f"wrote {png}" in capsys.readouterr().out and _png_size(png)[0] >= 600
    png.unlink()
    assert compare.main([*map(str, runs), "--plot", str(png)]) == 0  # labels: the directory names
    capsys.readouterr()
    png.unlink()
    assert compare.main([*map(str, runs), "--plot", str(png), "--labels", "a,b,c"]) == 1
    captured = capsys.readouterr()
    assert "ConfigError" in captured.err and "3 labels" in captured.err and captured.out == ""
    assert not png.exists()
    with pytest.raises(SystemExit):
        compare.main([*map(str, runs), "--labels", "a,b"])  # --labels without --plot

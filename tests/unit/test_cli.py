"""The `rsd` command: every subcommand explains itself, typed errors end with their message and exit 1."""

import pytest

from rsd import cli

pytestmark = pytest.mark.unit


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_has_help(capsys, name):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"rsd {name}" in out and "--" in out


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate"])
    assert exit_.value.code == 2


def test_typed_error_prints_fix_and_exits_1(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"suite": "libero_spatial", "policy": "expert", "seed": 7, "max_steps": 220, '
                                       '"num_steps_wait": 10}\n')  # an rsd eval run dir ...
    (tmp_path / "episodes.jsonl").write_text('{"x": 1}\n')  # ... with results
    code = cli.main(["eval", "--policy", "expert", "--out", str(tmp_path), "--no-render", "--trials", "1"])
    assert code == 1
    assert "--resume" in capsys.readouterr().err

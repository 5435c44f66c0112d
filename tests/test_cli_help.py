"""Help that teaches: `minimoe --help` is quick (imports no command module, so not torch), every command
has a description, an example and its defaults, the same flag names mean the same thing everywhere, and
the sweep file format is in `compare --help`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minimoe.cli.main import COMMANDS_TABLE, build_parser, main

SRC = str(Path(__file__).parents[1] / "src")


def test_top_level_help_imports_no_command_module():
    code = (
        "import sys\nfrom minimoe.cli.main import main\n"
        "rc = main(['--help'])\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'rich', 'minimoe.cli.train') if m in sys.modules)\n"
        "print('HEAVY', heavy, rc)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": SRC})  # fmt: skip
    assert "HEAVY [] 0" in p.stdout, p.stdout + p.stderr
    for name in COMMANDS_TABLE:
        assert f"    {name} " in p.stdout, name
    assert "one module per subcommand" not in p.stdout  # describes the tool, not the code


@pytest.mark.parametrize("name", list(COMMANDS_TABLE))
def test_every_command_has_a_description_an_example_and_defaults(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    desc = out.split("\n\n")[1]
    assert desc.strip() and not desc.startswith(("positional", "options")), out
    assert f"example:\n  minimoe {name}" in out
    parser = build_parser([name])
    sub = parser._subparsers._group_actions[0].choices[name]
    for action in sub._actions:
        if action.option_strings and action.help not in (None, "==SUPPRESS==") and action.default not in (
            None, False, [], "", "==SUPPRESS==",
        ):  # fmt: skip
            flag = action.option_strings[-1]
            options = out[out.index("\noptions:") :]
            block = options[options.index(f" {flag}") :]
            entry = block.split("\n  -")[0]  # up to the next option
            assert "default" in entry.lower(), (name, flag, entry)


def test_inspect_takes_checkpoint_like_the_other_commands_and_the_old_spelling():
    parser = build_parser(["inspect"])
    assert parser.parse_args(["inspect", "r", "--checkpoint", "latest"]).checkpoint == "latest"
    assert parser.parse_args(["inspect", "r", "--which", "latest"]).checkpoint == "latest"
    assert parser.parse_args(["inspect", "r"]).checkpoint == "best"
    for name in ("generate", "eval", "serve", "inspect"):
        flags = {f for a in build_parser([name])._subparsers._group_actions[0].choices[name]._actions
                 for f in a.option_strings}  # fmt: skip
        assert "--checkpoint" in flags, name


def test_compare_help_documents_the_sweep_file(capsys):
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("base:", "budget:", "seeds:", "variants:", "overrides:"):
        assert key in out, key


def test_eval_task_options_are_the_library_table():
    from minimoe.errors import MinimoeError
    from minimoe.eval.runner import check_options

    check_options("perplexity", {"window": 32, "temperature": None})
    with pytest.raises(MinimoeError, match="window applies only to the perplexity task, not generation"):
        check_options("generation", {"window": 32})
    assert main(["eval", "r", "--task", "generation", "--data", "x.jsonl", "--window", "8"]) == 2


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    """`minimoe compare --plan ... | head -1`: the reader leaves early; no traceback, no 'internal error'."""
    import subprocess

    (tmp_path / "corpus.txt").write_text("hello world\n" * 50)
    sweep = tmp_path / "many.yaml"
    seeds = ", ".join(str(s) for s in range(1, 1501))  # ~100 KB of plan lines: more than a pipe holds
    sweep.write_text(
        "name: many\nbase:\n  overrides: [data.tokenizer=byte]\ndata: corpus.txt\n"
        f"budget: {{steps: 2}}\nseeds: [{seeds}]\nvariants:\n  a: []\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "minimoe", "compare", str(sweep), "--plan"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MINIMOE_CACHE": str(tmp_path / "cache")},  # not the user's ~/.cache/minimoe
    )
    assert proc.stdout.readline().startswith(b"a/seed_1 ")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "error" not in err and "Traceback" not in err, err


# ---------------------------------------------------------------- shared value types and exit codes


def test_integer_and_number_take_what_torch_takes():
    import argparse

    from minimoe.cli.args import integer, number

    assert integer(str(2**63 - 1)) == 2**63 - 1 and integer(str(-(2**63))) == -(2**63)
    assert integer("1_000") == 1000
    for bad in (str(2**63), str(-(2**63) - 1), "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            integer(bad)
    assert number("1e-3") == 1e-3
    for bad in ("inf", "-inf", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            number(bad)


def test_stop_string_reads_the_shell_escapes():
    from minimoe.cli.args import stop_string

    assert stop_string("\\n\\t") == "\n\t" and stop_string("end") == "end"


def test_check_writable_leaves_no_probe_and_keeps_an_existing_file(tmp_path):
    from minimoe.cli.args import check_writable
    from minimoe.errors import MinimoeError

    new = tmp_path / "sub" / "out.json"
    check_writable(new, "--out")
    assert not new.exists()  # the probe is gone: nothing is left if the command then fails
    old = tmp_path / "old.json"
    old.write_text("kept")
    check_writable(old, "--out")
    assert old.read_text() == "kept"
    with pytest.raises(MinimoeError, match="is a directory"):
        check_writable(tmp_path, "--out")


def test_exit_codes_without_a_command_and_on_interrupt(monkeypatch, capsys):
    import minimoe.cli.params as params

    assert main([]) == 2  # no command: the help, as a usage error
    assert "COMMAND" in capsys.readouterr().out

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(params, "run", interrupted)
    assert main(["params", "tiny"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_overrides_anywhere_on_the_line_all_apply(monkeypatch):
    """`minimoe params tiny A=1 --memory B=2`: overrides on both sides of an option reach the command."""
    import minimoe.cli.params as params

    seen = {}
    monkeypatch.setattr(params, "run", lambda args: seen.update(overrides=args.overrides))
    assert main(["params", "tiny", "model.num_hidden_layers=2", "--memory", "model.hidden_size=64"]) == 0
    assert seen["overrides"] == ["model.num_hidden_layers=2", "model.hidden_size=64"]


def test_an_unknown_option_with_a_value_is_not_an_override(capsys):
    assert main(["params", "tiny", "--lrr=3"]) == 2
    assert "unrecognized arguments: --lrr=3" in capsys.readouterr().err


def test_a_bad_command_line_names_its_command_like_its_other_errors(capsys):
    """argparse's refusals carry the command's prefix (`minimoe eval: error:`), as the command's own
    errors do; before a command is known, the program's."""
    assert main(["eval", "runs/x", "--task", "perplexity"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minimoe eval: error: the following arguments are required: --data"), err
    assert main(["trian"]) == 2
    assert capsys.readouterr().err.startswith("minimoe: error: argument COMMAND: invalid choice: 'trian'")

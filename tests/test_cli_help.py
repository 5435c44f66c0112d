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

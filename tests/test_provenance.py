"""Which code trained a run: minimoe.provenance, and the lab report's note on it."""

import shutil
import subprocess

import pytest

from minimoe.lab.report import code_note
from minimoe.provenance import code_label, code_version, git_state

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _git(repo, *args):
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        check=True, capture_output=True,
    )  # fmt: skip


@needs_git
def test_git_state_reads_the_commit_only_where_the_package_is_tracked(tmp_path):
    pkg = tmp_path / "repo" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    assert git_state(pkg) == {"commit": None, "modified": None}  # not in a repository
    _git(tmp_path / "repo", "init", "-q")
    (tmp_path / "repo" / "other.txt").write_text("o\n")
    _git(tmp_path / "repo", "add", "other.txt")
    _git(tmp_path / "repo", "commit", "-qm", "other")
    # inside a repository that does not track the package (an installed copy in someone's project)
    assert git_state(pkg) == {"commit": None, "modified": None}
    _git(tmp_path / "repo", "add", "pkg/__init__.py")
    _git(tmp_path / "repo", "commit", "-qm", "pkg")
    head = subprocess.run(
        ["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_state(pkg) == {"commit": head, "modified": False}
    (tmp_path / "repo" / "other.txt").write_text("changed outside the package\n")
    assert git_state(pkg)["modified"] is False
    (tmp_path / "repo" / ".gitignore").write_text("__pycache__/\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "mod.pyc").write_bytes(b"ignored")
    assert git_state(pkg)["modified"] is False  # ignored files are not the code
    (pkg / "new_module.py").write_text("y = 1\n")  # a module added but not committed yet
    assert git_state(pkg) == {"commit": head, "modified": True}
    (pkg / "new_module.py").unlink()
    (pkg / "__init__.py").write_text("x = 2\n")
    assert git_state(pkg) == {"commit": head, "modified": True}


@needs_git
def test_git_state_says_unknown_where_git_status_fails(tmp_path, monkeypatch):
    import minimoe.provenance as provenance

    pkg = tmp_path / "repo" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    _git(tmp_path / "repo", "init", "-q")
    _git(tmp_path / "repo", "add", "pkg/__init__.py")
    _git(tmp_path / "repo", "commit", "-qm", "pkg")
    real = provenance._git

    def failing_status(src, *args):
        if "status" in args:  # e.g. a damaged index: exit 128
            return subprocess.CompletedProcess(args, 128, "", "fatal: index file corrupt")
        return real(src, *args)

    monkeypatch.setattr(provenance, "_git", failing_status)
    state = git_state(pkg)
    assert state["commit"] and state["modified"] is None


def test_code_version_and_its_label():
    import torch

    info = code_version()
    assert info["torch"] == torch.__version__ and info["minimoe"]
    assert code_label({"commit": "0123456789abcdef", "modified": True}) == "commit 0123456789, modified"
    assert code_label({"commit": None, "minimoe": "0.1.0"}) == "minimoe 0.1.0"
    assert code_label(None) is None


def test_a_checkpoint_records_the_code_that_wrote_it(tmp_path):
    import json

    import torch

    from minimoe.train.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {}, {"step": 1}, "model: {}\n", None)
    assert json.loads((ckpt / "meta.json").read_text())["code"] == json.loads(json.dumps(code_version()))


def test_the_report_note_names_each_version_and_warns_under_a_time_budget():
    rows = [
        {"variant": "moe", "code_by_seed": {1: "commit aaaaaaaaaa", 2: "commit bbbbbbbbbb, modified"}},
        {"variant": "dense", "code_by_seed": {1: "commit aaaaaaaaaa", 2: None}},
    ]
    note = code_note(rows, time_budget=True)
    assert note.startswith("Code: the runs were trained by 3 versions; commit aaaaaaaaaa: moe/1, dense/1; ")
    assert (
        "commit bbbbbbbbbb, modified: moe/2; code not recorded (checkpoints written before minimoe recorded it): dense/2."
        in note
    )
    assert note.endswith("compare runs of one version.")
    assert "time budget" not in code_note(rows, time_budget=False)
    same = [
        {"variant": "a", "code_by_seed": {1: "commit aaaaaaaaaa"}},
        {"variant": "b", "code_by_seed": {1: "commit aaaaaaaaaa"}},
    ]
    assert code_note(same, time_budget=True) == "Code: every run was trained by commit aaaaaaaaaa."
    assert code_note([{"variant": "a", "code_by_seed": {}}], time_budget=True) == ""


def test_history_continues_only_where_the_code_changed(monkeypatch):
    import minimoe.provenance as provenance

    old, new = {"commit": "a" * 40, "modified": False}, {"commit": "b" * 40, "modified": True}
    monkeypatch.setattr(provenance, "code_version", lambda: new)
    assert provenance.continue_history({"code": new}, 7) == [{"from_step": 0, "code": new}]
    history = provenance.continue_history({"code": old}, 7)  # a checkpoint from before the history
    assert history == [{"from_step": 0, "code": old}, {"from_step": 7, "code": new}]
    assert provenance.continue_history({"code_history": history, "code": new}, 9) == history
    assert provenance.continue_history({}, 5) == [{"from_step": 5, "code": new}]
    meta = {"code_history": history, "code": new}
    assert provenance.history_label(meta) == "commit aaaaaaaaaa to step 7, then commit bbbbbbbbbb, modified"
    assert provenance.history_label({"code_history": history[:1], "code": old}) == "commit aaaaaaaaaa"
    assert provenance.history_label({"code": old}) == "commit aaaaaaaaaa"


def test_a_run_resumed_under_other_code_records_both(tmp_path, corpus):
    import json

    from test_train import _train

    from minimoe.lab.report import _run_code

    run = tmp_path / "run"
    _train(run, corpus, "train.max_steps=2")
    meta_file = run / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["code_history"] == [{"from_step": 0, "code": meta["code"]}]
    earlier = {**meta["code"], "commit": "0123456789abcdef", "modified": False}
    meta_file.write_text(
        json.dumps({**meta, "code": earlier, "code_history": [{"from_step": 0, "code": earlier}]})
    )
    _train(run, corpus, "train.max_steps=4", resume=True)
    resumed = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert resumed["code_history"] == [
        {"from_step": 0, "code": earlier},
        {"from_step": 2, "code": meta["code"]},
    ]
    assert _run_code(run) == f"commit 0123456789 to step 2, then {code_label(meta['code'])}"

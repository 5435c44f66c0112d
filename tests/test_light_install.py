"""`pip install -e .` (no extras) is enough for train, generate, eval, serve and export: the commands run
in a process where every installed package outside pyproject.toml's core dependencies (and what they
pull in) fails to import, as on a fresh light install."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tiny import TINY_TRAIN

ROOT = Path(__file__).parents[1]
EXTRAS = ("datasets", "matplotlib", "transformers", "peft", "lm_eval", "sacrebleu", "tensorboard", "wandb")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;(]", requirement, maxsplit=1)[0]


def _core_closure() -> set[str]:
    """The distributions the core dependencies pull in (their requirements without extras, recursively)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        todo = [_name(d) for d in tomllib.load(f)["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        n = _norm(todo.pop())
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = md.requires(n) or []
        except md.PackageNotFoundError:
            continue
        todo += [_name(r) for r in reqs if "extra" not in r.split(";", 1)[-1] or ";" not in r]
    return seen


def _blocked() -> list[str]:
    """Top-level modules of installed distributions that a light install would not have."""
    core = _core_closure() | {"minimoe", "pip", "setuptools", "wheel", "pytest", "pluggy", "iniconfig"}
    out = []
    for top, dists in md.packages_distributions().items():
        if top in sys.stdlib_module_names or top.startswith("_"):
            continue
        if not any(_norm(d) in core for d in dists):
            out.append(top)
    return sorted(out)


def test_core_commands_work_without_the_extras(tmp_path):
    blocked = _blocked()
    assert set(EXTRAS) & set(blocked) == {m for m in EXTRAS if m in md.packages_distributions()}
    (tmp_path / "t.txt").write_text("the cat sat on the mat and the dog ran\n" * 300, encoding="utf-8")
    train = ["train", "--data", "t.txt", "--out", "run", "--no-progress", "--no-sample", *TINY_TRAIN,
             "train.max_steps=2", "train.eval_every=2"]  # fmt: skip
    # a None entry in sys.modules makes `import x` raise ImportError and find_spec("x") answer None,
    # exactly as when x is not installed
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None
from minimoe.cli.main import main
assert main({train!r}) == 0
assert main(["generate", "run", "--prompt", "the", "--max-new-tokens", "4"]) == 0
assert main(["eval", "run", "--task", "perplexity", "--data", "t.txt", "--no-progress", "--json"]) == 0
assert main(["export", "run", "--out", "hf"]) == 0
import contextlib, io
err = io.StringIO()
with contextlib.redirect_stderr(err):  # the missing extra is named before the (missing) data is read
    assert main(["lora", "run", "--data", "missing.jsonl", "--out", "lora"]) == 2
assert "LoRA needs peft (pip install 'minimoe[hf]')" in err.getvalue(), err.getvalue()
from minimoe.serve import app_from_run
app = app_from_run("run")
print("ROUTES", sorted(r.path for r in app.routes if r.path.startswith("/v1")))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MINIMOE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                       cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "/v1/chat/completions" in p.stdout and (tmp_path / "hf" / "config.json").exists()

"""examples/deepspeed: the DeepSpeed JSON files leave the schedule to finetune.py, and a run that asks for
DeepSpeed where it is not installed stops with one sentence before any work."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deepspeed"


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json"])
def test_deepspeed_json_leaves_the_schedule_to_the_trainer(name):
    # with a "scheduler" section the Trainer runs DeepSpeed's scheduler instead of the cosine schedule
    # finetune.py asks for (transformers' deepspeed_optim_sched)
    config = json.loads((EXAMPLE / name).read_text())
    assert "scheduler" not in config
    assert config["optimizer"]["params"]["lr"] == "auto"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_finetune_without_deepspeed_installed_is_one_sentence(tmp_path):
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "finetune.py"), "--model", str(tmp_path / "no_model"),
         "--data", str(tmp_path / "no.jsonl"), "--out", str(tmp_path / "ft"),
         "--deepspeed", str(EXAMPLE / "ds_zero2.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "deepspeed" in lines[0].lower() and "Traceback" not in proc.stderr
    assert not (tmp_path / "ft").exists()

"""The lab notebook runs top to bottom (tiny settings, temporary folder), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "minimoe_lab.ipynb"


def test_lab_notebook_executes(tmp_path, monkeypatch):
    # the kernel inherits this environment: tiny config, all files under a working folder that does
    # not exist yet (the notebook creates it, as it must for a folder a user names)
    work = tmp_path / "lab"
    monkeypatch.setenv("MINIMOE_LAB_TINY", "1")
    monkeypatch.setenv("MINIMOE_LAB_DIR", str(work))
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError with the cell's traceback if any cell fails

    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "12 steps" in text  # trained
    assert "maxvio.png" in text and (work / "plots" / "expert_load_run.png").is_file()  # expert load
    assert "(sum 1.000)" in text  # routing shares add up
    assert "bits/byte" in text  # evaluated
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 6  # the figures of `plot` (router_z.png among them)
    htmls = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert htmls and "layer 0" in htmls[0]["data"]["text/html"]

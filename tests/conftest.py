import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # tests share the cores; before torch loads OpenMP

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py
# tiny test models gain nothing from threads, and threads thrash when the two cores are busy
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run the soak tests marked slow (CI does)"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    import pytest

    skip = pytest.mark.skip(reason="soak test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does; before torch loads OpenMP

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py
# tiny test models gain nothing from threads, and threads thrash when the two cores are busy
torch.set_num_threads(1)

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py
# tiny test models gain nothing from threads, and threads thrash when the two cores are busy
torch.set_num_threads(1)

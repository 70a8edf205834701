import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The parity tests assume the backend the environment selects; never a silent override here.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

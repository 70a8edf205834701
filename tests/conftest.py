import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The Triton tests need DENSENET_FAST_BACKEND=triton (and TRITON_INTERPRET=1 without a GPU)
# set before densenet_fast is imported: test_triton_interpreter.py runs them in a process
# of their own.
collect_ignore = [] if os.environ.get("DENSENET_FAST_BACKEND") == "triton" else ["with_triton"]

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The C++ kernels' measured GEMM engines persist across processes (cpu_engine_cache.py): each
# test process (an xdist worker and what it starts) keeps its own, apart from the user's file,
# read when densenet_fast is imported.
if "DENSENET_FAST_CPU_ENGINE_CACHE" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="densenet_fast-tests-")
    # Registered before densenet_fast's own exit hook, so it runs after the file is written.
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["DENSENET_FAST_CPU_ENGINE_CACHE"] = os.path.join(_cache_dir,
                                                                "cpu-gemm-engines.json")

# The Triton tests need DENSENET_FAST_BACKEND=triton (and TRITON_INTERPRET=1 without a GPU)
# set before densenet_fast is imported: test_triton_interpreter.py runs them in a process
# of their own.
collect_ignore = [] if os.environ.get("DENSENET_FAST_BACKEND") == "triton" else ["with_triton"]

# Under pytest-xdist the workers share the cores: each gets its share of threads, and so do
# the processes its tests start (OMP_NUM_THREADS), instead of every one spinning on all.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, torch.get_num_threads() // _workers))
torch.set_num_threads(_threads)
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = str(_threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

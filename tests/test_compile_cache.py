"""A compiled training step is saved in AOTAutograd's cache, so that a new process loads it
instead of compiling the model again (as it does for torchvision's DenseNet)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One compiled training step (forward and backward) of a tiny model on inductor, in a fresh
# process; prints AOTAutograd's cache counters.
STEP = """
import json
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from densenet_fast import DenseNet

torch.set_num_threads(1)
torch.manual_seed(0)
model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
compiled = torch.compile(model, backend="inductor", fullgraph=True)
x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
F.cross_entropy(compiled(x), y).backward()
assert all(p.grad is not None for p in model.parameters())
print(json.dumps(dict(counters["aot_autograd"])))
"""


def _compiled_step_counters(cache_dir: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for name in ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCHINDUCTOR_AUTOGRAD_CACHE",
                 "TORCHINDUCTOR_FX_GRAPH_CACHE"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", STEP], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_compiled_step_from_the_aot_autograd_cache(tmp_path):
    first = _compiled_step_counters(tmp_path)
    assert first.get("autograd_cache_bypass", 0) == 0, first
    assert first.get("autograd_cache_saved", 0) > 0, first
    second = _compiled_step_counters(tmp_path)
    assert second.get("autograd_cache_bypass", 0) == 0, second
    assert second.get("autograd_cache_hit", 0) > 0, second
    assert second.get("autograd_cache_miss", 0) == 0, second

"""torch.autocast on CPU (bfloat16): the fused model stays as close to float32 as the
unfused model under the same autocast."""

import torch
import torch.nn.functional as F
from helpers import twins
from tolerances import assert_as_accurate, assert_close

from densenet_fast import DenseNet, NaiveDenseNet


def _logits_and_grads(model, x, y, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return logits.float().detach(), grads


def test_bfloat16_autocast_matches_float32_as_well_as_the_unfused_model():
    fast, naive = twins(DenseNet, NaiveDenseNet, growth_rate=8, block_config=(3, 3),
                        num_init_features=16, num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    exact_logits, exact_grads = _logits_and_grads(fast, x, y, autocast=False)
    fast_logits, fast_grads = _logits_and_grads(fast, x, y, autocast=True)
    naive_logits, naive_grads = _logits_and_grads(naive, x, y, autocast=True)
    assert fast_logits.dtype == torch.float32
    assert_close(fast_logits, exact_logits, torch.bfloat16, "bf16 logits vs float32")
    # bf16 gradients are far from float32 ones in any implementation; the bar is the
    # unfused model's own distance under the same autocast.
    assert_as_accurate(fast_grads, naive_grads, exact_grads, torch.bfloat16, "bf16 gradients")
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())

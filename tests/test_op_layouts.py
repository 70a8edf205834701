"""What the fused ops return and what they write, against what their contracts promise
(``ops/schema.py``), for every kernel: the reference kernels and the dispatcher's (the C++
ones here; the Triton ones in ``with_triton/``).

- Every output is laid out as the op's fake says, whatever the inputs' layouts: the fake is
  what ``torch.compile`` plans the rest of the graph with. ATen's ops follow a non-dense
  input's strides (a channel slice of a channels-last tensor gives channels-last-like output)
  where the fakes make the output dense in ``memory_format_of``'s format; the reference
  kernels used to return ATen's layout, and the C++ pool backward disagreed with its fake.
- The values, whatever the layouts, match the reference kernels'.
- A tensor an op adds into in place may not have two elements at one address (an expanded
  tensor), ATen's rule for in-place writes: the C++ coefficient kernel and the Triton
  backward used to sum into it silently.
"""

import pytest
import torch
from op_cases import (
    LAYOUT_KINDS,
    assert_kernels_match_reference,
    assert_laid_out_as_fake,
    expanded,
    layout_cases,
)

from densenet_fast.ops import torch_impl

OPS = ["bn_relu", "add_stats_term", "bn_relu_conv1x1", "bn_relu_conv1x1_backward",
       "bn_relu_max_pool2d", "bn_relu_max_pool2d_backward", "channel_stats", "bn_backward"]
KERNELS = {"reference": lambda name: getattr(torch_impl, name),
           "dispatcher": lambda name: getattr(torch.ops.densenet_fast, name)}


@pytest.mark.parametrize("kernels", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_outputs_are_laid_out_as_the_fakes_say(kind, dtype, kernels):
    for name, args in layout_cases(kind, dtype).items():
        assert_laid_out_as_fake(name, KERNELS[kernels](name), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_compiled_kernels_match_the_reference_over_layouts(kind, dtype):
    """The values too: the C++ add_stats_term wrote NCHW rows into the transposed-plane
    layout its output takes from a transposed input (wrong values, silently)."""
    assert_kernels_match_reference(kind, dtype)


@pytest.mark.parametrize("kind", ["slice-of-nhwc", "rows", "nhwc"])
def test_opcheck_of_every_op_over_layouts(kind):
    """The same through ``torch.library.opcheck`` (fake tensors against the dispatcher's
    kernels, as ``torch.compile`` meets them)."""
    for name, args in layout_cases(kind, torch.float32).items():
        torch.library.opcheck(getattr(torch.ops.densenet_fast, name).default, args,
                              test_utils=("test_faketensor",))


@pytest.mark.parametrize("kernels", list(KERNELS))
def test_an_expanded_gradient_buffer_is_refused_before_anything_is_written(kernels):
    args = list(layout_cases("nchw", torch.float32)["bn_relu_conv1x1_backward"])
    grad_buffer = torch.zeros_like(args[-1])
    args[-1] = expanded(grad_buffer)
    with pytest.raises(RuntimeError, match="grad_buffer has elements that share one memory"):
        KERNELS[kernels]("bn_relu_conv1x1_backward")(*args)
    assert not grad_buffer.any()


@pytest.mark.parametrize("kernels", list(KERNELS))
@pytest.mark.parametrize("which", ["kx", "k0"])
def test_expanded_coefficients_are_refused_before_anything_is_written(which, kernels):
    c = 6
    kx, k0 = torch.zeros(c), torch.zeros(c)
    vectors = [torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c),
               torch.randn(c)]
    coefficients = {"kx": kx, "k0": k0}
    coefficients[which] = expanded(coefficients[which])
    with pytest.raises(RuntimeError, match=f"{which} has elements that share one memory"):
        KERNELS[kernels]("add_stats_coefficients")(*coefficients.values(), *vectors, 10)
    assert not kx.any() and not k0.any()


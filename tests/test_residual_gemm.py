"""engines/torch_fast/residual_gemm.py (c += a @ b in place, and linear + residual built on it) and the parts
helpers that feed it: `in_out_matrix` and `group_norm_rows` (whose second output is the accumulated-into residual)."""

import pytest
import torch
import torch.nn.functional as F

from engines.torch_fast import residual_gemm
from engines.torch_fast.residual_gemm import accumulate_mm, linear_plus_residual


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("batched", [False, True])
def test_accumulate_mm_adds_the_product_in_place(batched):
    lead = (2,) if batched else ()
    a, b, c = _rand(*lead, 5, 7, seed=1), _rand(*lead, 7, 3, seed=2), _rand(*lead, 5, 3, seed=3)
    want = c + a @ b
    out = accumulate_mm(c, a, b)
    assert out.data_ptr() == c.data_ptr()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_accumulate_mm_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="do not chain"):
        accumulate_mm(_rand(5, 3), _rand(5, 7), _rand(6, 3))
    with pytest.raises(ValueError, match="all 2-D or all 3-D"):
        accumulate_mm(_rand(5, 3), _rand(2, 5, 7), _rand(7, 3))
    with pytest.raises(ValueError, match="contiguous"):
        accumulate_mm(_rand(3, 5).t(), _rand(5, 7), _rand(7, 3))


def test_linear_plus_residual_is_linear_plus_residual():
    linear = torch.nn.Linear(16, 8).double()
    g, h = _rand(2, 10, 16, seed=4), _rand(2, 10, 8, seed=5)
    got = linear_plus_residual(g, linear.weight.t(), linear.bias, h)
    torch.testing.assert_close(got, linear(g) + h, rtol=1e-12, atol=1e-12)
    assert h.equal(_rand(2, 10, 8, seed=5)), "the residual itself must not be written"


def test_linear_plus_residual_twin_weights():
    w, bias = _rand(2, 16, 8, seed=6), _rand(2, 8, seed=7)  # (G, in, out), (G, out)
    g, h = _rand(2, 10, 16, seed=8), _rand(2, 10, 8, seed=9)
    want = torch.stack([g[i] @ w[i] + bias[i] + h[i] for i in range(2)])
    torch.testing.assert_close(linear_plus_residual(g, w, bias, h), want, rtol=1e-12, atol=1e-12)


def test_compiled_feed_forward_accumulates_without_copying_c():
    """Inductor must hand the fresh residual + bias buffer to the operator in place: no clone / copy of it,
    or the kernel this saves comes back as a copy."""
    from torch._inductor.utils import run_and_get_code

    linear = torch.nn.Linear(32, 16)

    def block(x, y, g):
        h = x + y
        n = F.layer_norm(h, (16,))
        return linear_plus_residual(g * n.sum(-1, keepdim=True), linear.weight.t(), linear.bias, h) * 2

    x, y, g = (torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 32))
    torch._dynamo.reset()
    with torch.no_grad():
        want = block(x, y, g)
        got, (code, *_) = run_and_get_code(torch.compile(block), x, y, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "cnrt.accumulate_mm" in code
    assert "clone" not in code and ".copy_(" not in code, code



def test_in_out_matrix_reads_every_linear_form():
    from engines.torch_fast.gemm_conv import GemmConv2d
    from engines.torch_fast.parts import in_out_matrix

    conv = torch.nn.Conv2d(6, 4, 1)
    linear = torch.nn.Linear(6, 4)
    x = torch.randn(5, 6)
    for layer, want in ((conv, conv(x[:, :, None, None])[:, :, 0, 0]), (linear, linear(x)),
                        (GemmConv2d(conv), conv(x[:, :, None, None])[:, :, 0, 0])):
        weight, bias = in_out_matrix(layer)
        assert tuple(weight.shape) == (6, 4)
        torch.testing.assert_close(x @ weight + bias, want)
    with pytest.raises(ValueError, match="not a 1x1"):
        in_out_matrix(torch.nn.Conv2d(6, 4, 3))


@pytest.mark.parametrize("stacks", [1, 2])
def test_group_norm_rows_is_the_group_norm_as_rows(stacks):
    from engines.torch_fast.parts import group_norm_rows, stacked_group_norm

    torch.manual_seed(0)
    x = (torch.randn(4, 64, 6, 5) * 3 + 1).to(memory_format=torch.channels_last)
    weight, bias, extra = torch.randn(stacks, 64), torch.randn(stacks, 64), torch.randn(stacks, 64)
    if stacks == 1:
        weight, bias, extra = weight[0], bias[0], extra[0]
    rows, residual = group_norm_rows(x, 32, 1e-5, weight, bias, extra)
    want = stacked_group_norm(x, 32, 1e-5, weight, bias)
    torch.testing.assert_close(rows, want.permute(0, 2, 3, 1).reshape(stacks, -1, 64))
    want_residual = x.permute(0, 2, 3, 1).reshape(stacks, -1, 30, 64) + extra.reshape(stacks, 1, 1, 64)
    torch.testing.assert_close(residual, want_residual.reshape(stacks, -1, 64))
    assert residual.is_contiguous()
    assert group_norm_rows(x, 32, 1e-5, weight, bias)[1] is None

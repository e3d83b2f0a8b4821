"""The GEGLU GEMM kernel computes hidden * gelu(gate) of x's projection, for both weight layouts the step passes.

CPU: the kernel and its TMA variant through Triton's interpreter (nn.Linear weights read transposed; the twin's
stacked (G, K, 2N) weights; a row count that does not fill a block; with and without bias). GPU: the SD1.5 shapes, and the operator
inside torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import run_interpreted

GEGLU_CHECK = r"""
import sys
import torch
from engines.torch_fast.triton_geglu import geglu_linear, geglu_linear_tma, reference
groups, rows, k, n_out, with_bias, tma, early = (int(v) for v in sys.argv[1:])
torch.manual_seed(0)
if groups == 0:  # an nn.Linear weight (2N, K), x (B, T, K)
    x = torch.randn(2, rows, k)
    weight = torch.randn(2 * n_out, k) / k ** 0.5
    bias = torch.randn(2 * n_out) if with_bias else None
else:  # the twin's stacked (G, K, 2N) matrices, x (G, rows, K)
    x = torch.randn(groups, rows, k)
    weight = torch.randn(groups, k, 2 * n_out) / k ** 0.5
    bias = torch.randn(groups, 2 * n_out) if with_bias else None
x, weight = x.half(), weight.half()
bias = None if bias is None else bias.half()
if tma:
    got = geglu_linear_tma(x, weight, bias, config=(64, 128, 4, 2), early_bias=bool(early))
else:
    got = geglu_linear(x, weight, bias, config=(64, 128, 4, 2))
ref = reference(x.float(), weight.float(), None if bias is None else bias.float())
assert got.shape == ref.shape and got.dtype == torch.float16, (got.shape, got.dtype)
print((got.float() - ref).abs().max().item())
"""


@pytest.mark.parametrize("tma", [0, 1], ids=["gather", "tma"])
@pytest.mark.parametrize("groups,rows,k,n_out,with_bias", [
    (0, 40, 64, 128, 1),    # Linear weight, rows that do not fill a block
    (2, 70, 128, 128, 1),   # stacked twin weights, two K steps; the TMA kernel's tiles run past group 0's rows
    (1, 64, 64, 256, 0),    # no bias, two column blocks
])
def test_geglu_kernel_equals_reference_interpreted(groups, rows, k, n_out, with_bias, tma):
    out = run_interpreted(GEGLU_CHECK, [str(v) for v in (groups, rows, k, n_out, with_bias, tma, 0)], timeout=900)
    assert float(out.strip().splitlines()[-1]) < 2e-2


@pytest.mark.parametrize("groups,rows,k,n_out", [(0, 40, 64, 128), (2, 70, 128, 128)], ids=["linear", "stacked"])
def test_geglu_early_bias_equals_reference_interpreted(groups, rows, k, n_out):
    """The TMA kernel with its biases as the accumulators' initial values (CNRT_GEGLU_EARLY_BIAS)."""
    out = run_interpreted(GEGLU_CHECK, [str(v) for v in (groups, rows, k, n_out, 1, 1, 1)], timeout=900)
    assert float(out.strip().splitlines()[-1]) < 2e-2


NO_GELU_CHECK = r"""
import torch
from engines.torch_fast.triton_geglu import geglu_linear_tma
torch.manual_seed(0)
x, weight, bias = torch.randn(40, 64).half(), (torch.randn(256, 64) / 8).half(), torch.randn(256).half()
got = geglu_linear_tma(x, weight, bias, config=(64, 128, 4, 2), gelu=False)
hidden, gate = torch.nn.functional.linear(x.float(), weight.float(), bias.float()).chunk(2, dim=-1)
print((got.float() - hidden * gate).abs().max().item())
"""


def test_geglu_probe_without_gelu_interpreted():
    """gelu=False (bench.geglu_kernels --epilogue) writes hidden * gate from the same tiles, and needs a config."""
    from engines.torch_fast import triton_geglu

    out = run_interpreted(NO_GELU_CHECK, [], timeout=900)
    assert float(out.strip().splitlines()[-1]) < 2e-2
    with pytest.raises(ValueError, match="config"):
        triton_geglu.geglu_linear_tma(torch.randn(4, 64), torch.randn(256, 64), None, gelu=False)


def test_geglu_falls_back_on_cpu_and_untiled_shapes():
    from engines.torch_fast import triton_geglu

    x = torch.randn(2, 5, 32)
    weight, bias = torch.randn(96, 32), torch.randn(96)
    assert not triton_geglu.fits(x, weight)  # K=32 is not a multiple of 64
    hidden, gate = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)
    torch.testing.assert_close(triton_geglu.geglu(x, weight, bias), hidden * torch.nn.functional.gelu(gate))
    with pytest.raises(ValueError, match="multiple"):
        triton_geglu.geglu_linear(x, weight, bias)


SD15_FF = [(0, 1536, 320, 1280), (2, 3072, 320, 1280), (0, 384, 640, 2560), (2, 192, 1280, 5120), (0, 96, 1280, 5120)]


@pytest.mark.gpu
@pytest.mark.parametrize("with_prefix", [False, True], ids=["plain", "prefix"])
@pytest.mark.parametrize("groups,rows,k,n_out", SD15_FF)
def test_geglu_kernel_on_sd15_shapes(groups, rows, k, n_out, with_prefix):
    """The operator inside torch.compile; with_prefix: the [h, g] rows the proj_out fold reads (h = N / 4 wide)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engines.torch_fast import triton_geglu

    g = torch.Generator("cuda").manual_seed(0)
    lead = (2,) if groups == 0 else (groups,)
    x = torch.randn(*lead, rows, k, device="cuda", generator=g).half()
    wshape = (2 * n_out, k) if groups == 0 else (groups, k, 2 * n_out)
    weight = (torch.randn(*wshape, device="cuda", generator=g) / k ** 0.5).half()
    bias = torch.randn(*wshape[:-2], 2 * n_out, device="cuda", generator=g).half()
    prefix = torch.randn(*lead, rows, n_out // 4, device="cuda", generator=g).half() if with_prefix else None
    ref = triton_geglu.reference(x.float(), weight.float(), bias.float(), None if prefix is None else prefix.float())
    got = torch.compile(triton_geglu.geglu, fullgraph=True)(x, weight, bias, prefix)
    assert got.shape == ref.shape
    if prefix is not None:
        assert torch.equal(got[..., : n_out // 4], prefix)
    assert (got.float() - ref).abs().max().item() < 2e-2 * max(1.0, ref.abs().max().item() / 8)


PREFIX_CHECK = r"""
import sys
import torch
from engines.torch_fast.triton_geglu import geglu_linear_tma, reference
groups, rows, k, n_out, ratio = (int(v) for v in sys.argv[1:])
torch.manual_seed(0)
lead = (2,) if groups == 0 else (groups,)
x = torch.randn(*lead, rows, k).half()
weight = (torch.randn(2 * n_out, k) if groups == 0 else torch.randn(groups, k, 2 * n_out)) / k ** 0.5
bias = torch.randn(2 * n_out) if groups == 0 else torch.randn(groups, 2 * n_out)
prefix = torch.randn(*lead, rows, n_out // ratio).half()
got = geglu_linear_tma(x, weight.half(), bias.half(), config=(64, 128, 4, 2), prefix=prefix)
ref = reference(x.float(), weight.half().float(), bias.half().float(), prefix.float())
assert got.shape == ref.shape == (*lead, rows, n_out // ratio + n_out), (got.shape, ref.shape)
assert torch.equal(got[..., : n_out // ratio], prefix)  # copied, not recomputed
print((got.float() - ref).abs().max().item())
"""


@pytest.mark.parametrize("groups,rows,k,n_out,ratio", [
    (0, 40, 64, 256, 4),   # Linear weight, rows that do not fill a block: [h (64), g (256)] as the step folds it
    (2, 70, 128, 128, 4),  # stacked twin weights, tiles running past group 0's rows
    (1, 64, 64, 256, 2),   # another width ratio
])
def test_geglu_prefix_rows_interpreted(groups, rows, k, n_out, ratio):
    """The kernel writes [prefix, hidden * gelu(gate)] rows: what `residual_gemm.folds_feed_forward` feeds
    proj_out's folded weight."""
    out = run_interpreted(PREFIX_CHECK, [str(v) for v in (groups, rows, k, n_out, ratio)], timeout=900)
    assert float(out.strip().splitlines()[-1]) < 2e-2


def test_geglu_prefix_widths_are_checked():
    from engines.torch_fast import triton_geglu

    if triton_geglu.triton is not None:  # the TMA tiles exist with Triton only
        assert min(bn for _, bn, _, _ in triton_geglu.TMA_TILES) // triton_geglu.PREFIX_MAX_RATIO >= 2
    x, weight = torch.randn(2, 8, 64), torch.randn(512, 64)
    assert triton_geglu.prefix_ratio(x, weight, torch.randn(2, 8, 64)) == 4
    for bad in (torch.randn(2, 8, 48), torch.randn(2, 8, 4), torch.randn(2, 7, 64)):
        with pytest.raises(ValueError, match="prefix"):
            triton_geglu.prefix_ratio(x, weight, bad)
    out = triton_geglu.geglu(x, weight, None, prefix=x)  # CPU: the reference, [prefix, GEGLU]
    torch.testing.assert_close(out, torch.cat([x, triton_geglu.reference(x, weight, None)], dim=-1))


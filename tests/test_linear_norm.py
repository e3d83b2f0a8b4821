"""The linear + LayerNorm kernel computes (residual + a @ W + b, LN(...)), and the transformers' fused form (proj_in
and both attention outputs each with the norm after them) computes the step the unfused form computes.

CPU: the kernel through Triton's interpreter (Linear-layout and stacked twin weights, one or two column blocks,
with and without residual and extra bias, rows that do not fill a block); the width rules; the tiny model's step
with the fused form on and off (its 64-channel transformers take it). GPU: the SD1.5 32x48 shapes through the
operator inside torch.compile.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engines.torch_fast import linear_norm
from tests.triton_interpreter import run_interpreted

KERNEL_CHECK = r"""
import sys
import torch
from engines.torch_fast import linear_norm as L
groups, m, k, n, res, extra, linear_layout = (int(v) for v in sys.argv[1:])
torch.manual_seed(0)
g = max(groups, 1)
a = torch.randn(*((2, m, k) if groups == 0 else (g, m, k))).half()
if groups == 0:
    w = ((torch.randn(n, k) / k ** 0.5).half().t() if linear_layout else (torch.randn(k, n) / k ** 0.5).half())
else:
    w = (torch.randn(g, k, n) / k ** 0.5).half()
vec = (n,) if groups == 0 else (g, n)
b, nw, nb, eb = (torch.randn(*vec).half() for _ in range(4))
r = torch.randn(*a.shape[:-1], n).half() if res else None
h, normed = L.linear_norm_kernel(a, w, b, nw, nb, 1e-5, r, eb if extra else None, tile=(32, 4, 1))
rh, rn = L.reference(a.float(), w.float(), b.float(), nw.float(), nb.float(), 1e-5,
                     None if r is None else r.float(), eb.float() if extra else None)
assert h.shape == rh.shape and normed.shape == rn.shape and h.dtype == torch.float16
print((h.float() - rh).abs().max().item(), (normed.float() - rn).abs().max().item())
"""


@pytest.mark.parametrize("groups,m,k,n,res,extra,linear_layout", [
    (0, 70, 64, 320, 1, 1, 1),   # Linear-layout weight read transposed, 256 + 64 columns, 3 row blocks
    (2, 40, 128, 320, 1, 0, 0),  # stacked twin weights, two K steps
    (0, 33, 64, 64, 0, 0, 0),    # one column block, no residual
    (2, 64, 64, 96, 0, 1, 0),    # 64 + 32 columns, extra bias only
])
def test_kernel_equals_reference_interpreted(groups, m, k, n, res, extra, linear_layout):
    out = run_interpreted(KERNEL_CHECK, [str(v) for v in (groups, m, k, n, res, extra, linear_layout)], timeout=900)
    err_h, err_n = (float(v) for v in out.strip().splitlines()[-1].split())
    assert err_h < 1e-2 and err_n < 1e-2  # fp16 rounding of values up to ~8


def test_widths_the_kernel_holds():
    assert linear_norm.column_blocks(320) == (256, 64)
    assert linear_norm.column_blocks(64) == (64, 0)
    assert linear_norm.column_blocks(96) == (64, 32)
    assert linear_norm.column_blocks(448) is None  # 256 + 192
    assert linear_norm.fits(320, 320) and linear_norm.fits(64, 64)
    assert not linear_norm.fits(32, 64)  # K not a multiple of 64
    assert not linear_norm.fits(640, 640)  # wider than MAX_WIDTH
    assert not linear_norm.fits(64, 8 + 64)  # a column block under 16
    with pytest.raises(ValueError, match="multiple"):
        linear_norm.linear_norm_kernel(torch.randn(4, 32), torch.randn(32, 64), torch.randn(64), torch.ones(64),
                                       torch.zeros(64), 1e-5)


def test_fused_form_computes_the_unfused_step(tiny_bundle, tmp_path, monkeypatch):
    """The tiny model's 64-channel transformers take the fused form (on the CPU through `reference`): the twin step
    with it equals the twin step without it."""
    from engines.torch_fast.compile import CompileMode, PartCompiler
    from engines.torch_fast.runner import ConvKernels, FastStepRunner, StepLayout, _prepare_step_layers
    from profiles import get_profile
    from tests.test_twin import _step_inputs

    profile = get_profile("256x384-fp32")
    device = torch.device("cpu")
    compiler = PartCompiler(CompileMode.EAGER, tmp_path, {})
    bundle = copy.deepcopy(tiny_bundle)
    twin = _prepare_step_layers(bundle, profile, device, compiler, ConvKernels.CUDNN, StepLayout.TWIN).twin
    x, context, hint, scales = _step_inputs(bundle, profile, seed=3)
    calls = []
    original = linear_norm.reference

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(linear_norm, "reference", counted)
    outs = []
    for enabled in (False, True):
        monkeypatch.setattr(linear_norm, "ENABLED", enabled)
        runner = FastStepRunner(bundle, profile, device, compiler, twin)
        runner.prepare(context, hint, 7.5, scales)
        with torch.no_grad():
            outs.append(runner.step(x, 5))
        assert bool(calls) == enabled
    assert outs[0].abs().max() > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("groups,rows", [(0, 3072), (2, 3072), (2, 1536)])
def test_sd15_shapes_compiled(groups, rows):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator("cuda").manual_seed(0)
    n = 320
    g = max(groups, 1)
    a = torch.randn(*((rows, n) if groups == 0 else (g, rows, n)), device="cuda", generator=gen).half()
    w = (torch.randn(*((n, n) if groups == 0 else (g, n, n)), device="cuda", generator=gen) / n ** 0.5).half()
    vec = (n,) if groups == 0 else (g, n)
    b, nw, nb, eb = (torch.randn(*vec, device="cuda", generator=gen).half() for _ in range(4))
    r = torch.randn(*a.shape[:-1], n, device="cuda", generator=gen).half()
    got_h, got_n = torch.compile(linear_norm.linear_norm, fullgraph=True)(a, w, b, nw, nb, 1e-5, r, eb)
    ref_h, ref_n = linear_norm.reference(a.float(), w.float(), b.float(), nw.float(), nb.float(), 1e-5, r.float(),
                                         eb.float())
    assert (got_h.float() - ref_h).abs().max().item() < 2e-2
    assert (got_n.float() - ref_n).abs().max().item() < 2e-2

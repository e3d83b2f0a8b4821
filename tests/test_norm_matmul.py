"""The folded LayerNorm + linear kernel computes LN(x + shift) @ W (+ bias) (and GEGLU of it), and its torch form
`reference` computes what F.layer_norm followed by the linear layer computes.

CPU: the kernel through Triton's interpreter against LayerNorm + linear in fp32 (Linear-layout and stacked twin
weights, shared and per-group vectors, with and without shift and bias, plain and GEGLU outputs, rows and columns
that do not fill a block, rows with a large mean against their spread); `reference` against the same in fp32; the
pending-bias bookkeeping. GPU: the SD1.5 shapes through the operator inside torch.compile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.torch_fast import norm_matmul as nm
from tests.triton_interpreter import run_interpreted


def plain(x, w, nw, nb, eps, shift=None, bias=None, geglu=False):
    """LayerNorm(x + shift) then the linear layer, group by group: x (G, M, K) with stacked w (G, K, N), or (M, K)
    with a Linear-layout w (N, K); vectors (K,) or (G, K)."""
    if w.dim() == 2:
        y = F.linear(F.layer_norm(x + (0 if shift is None else shift), (x.shape[-1],), nw, nb, eps), w, bias)
    else:
        def at(v, g):
            return None if v is None else (v[g] if v.dim() == 2 else v)
        y = torch.stack([F.layer_norm(x[g] + (0 if shift is None else at(shift, g)), (x.shape[-1],), at(nw, g),
                                      at(nb, g), eps) @ w[g] + (0 if bias is None else bias[g])
                         for g in range(w.shape[0])])
    if geglu:
        hidden, gate = y.chunk(2, dim=-1)
        y = hidden * F.gelu(gate)
    return y


KERNEL_CHECK = r"""
import sys
import torch
from engines.torch_fast import norm_matmul as nm
from tests.test_norm_matmul import plain
groups, m, k, n, shift, bias, geglu, per_group, offset = (int(v) for v in sys.argv[1:])
torch.manual_seed(0)
g = max(groups, 1)
x = (torch.randn(*((m, k) if groups == 0 else (g, m, k))) + offset).half()
width = 2 * n if geglu else n
w = (torch.randn(width, k) / k ** 0.5).half() if groups == 0 else (torch.randn(g, k, width) / k ** 0.5).half()
vec = (g, k) if per_group else (k,)
nw, nb = torch.randn(*vec).half(), torch.randn(*vec).half()
sh = torch.randn(*vec) if shift else None
b = (torch.randn(width) if groups == 0 else torch.randn(g, width)).half() if bias else None
layer = nm.NormLinear(nw, nb, 1e-5, w, b, sh, bool(geglu))
got = nm.norm_matmul_kernel(x, layer.weight, layer.u, layer.v, 1e-5, layer.shift, layer.c, bool(geglu),
                            config=(32, 64, 4, 1))
same = layer(x)  # `reference` on the CPU: the kernel's arithmetic
ref = plain(x.float(), w.float(), nw.float(), nb.float(), 1e-5, sh, None if b is None else b.float(), bool(geglu))
assert got.shape == ref.shape == same.shape and got.dtype == torch.float16, (got.shape, ref.shape)
print((got.float() - ref).abs().max().item(), (got.float() - same.float()).abs().max().item(), ref.abs().max().item())
"""


@pytest.mark.parametrize("groups, m, k, n, shift, bias, geglu, per_group, offset", [
    (0, 70, 128, 96, 0, 0, 0, 0, 0),     # Linear layout, no shift / bias; rows and columns past a block
    (0, 40, 192, 64, 1, 1, 0, 0, 0),     # shift + bias
    (0, 33, 128, 64, 1, 1, 1, 0, 0),     # GEGLU with bias (the feed-forward's first half)
    (2, 50, 128, 64, 1, 0, 0, 1, 0),     # the twin's stacked weights, per-group vectors
    (2, 36, 128, 64, 1, 1, 1, 1, 0),     # stacked GEGLU
    (2, 20, 192, 80, 1, 0, 0, 0, 30),    # shared vectors over groups; rows with mean 30 against spread 1
])
def test_norm_matmul_kernel_equals_layer_norm_then_linear_interpreted(groups, m, k, n, shift, bias, geglu,
                                                                      per_group, offset):
    out = run_interpreted(KERNEL_CHECK, [str(v) for v in (groups, m, k, n, shift, bias, geglu, per_group, offset)],
                          timeout=900)
    err, err_same, scale = (float(v) for v in out.split())
    assert err <= 3e-3 * max(1.0, scale), out
    assert err_same <= 2e-3 * max(1.0, scale), out


@pytest.mark.parametrize("stacked, geglu", [(False, False), (True, True)])
def test_reference_is_layer_norm_then_linear(stacked, geglu):
    torch.manual_seed(0)
    if stacked:
        x, w, b = torch.randn(2, 5, 16), torch.randn(2, 16, 12), torch.randn(2, 12)
        nw, nb, sh = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 16)
    else:
        x, w, b = torch.randn(5, 16), torch.randn(12, 16), torch.randn(12)
        nw, nb, sh = torch.randn(16), torch.randn(16), torch.randn(16)
    layer = nm.NormLinear(nw, nb, 1e-5, w, b, sh, geglu)
    torch.testing.assert_close(layer(x), plain(x, w, nw, nb, 1e-5, sh, b, geglu), rtol=1e-5, atol=1e-5)


def test_fits_rules():
    x = torch.empty(4, 320)
    assert nm.fits(x, torch.empty(960, 320), geglu=False)
    assert nm.fits(x, torch.empty(2, 320, 2560), geglu=True)
    assert not nm.fits(torch.empty(4, 100), torch.empty(64, 100), geglu=False)  # K not a multiple of 64
    assert not nm.fits(x, torch.empty(2 * 100, 320), geglu=True)  # GEGLU halves not whole tiles


@pytest.mark.gpu
@pytest.mark.parametrize("groups, m, k, n, geglu", [
    (0, 3072, 320, 960, False), (0, 3072, 320, 320, False), (0, 3072, 320, 1280, True),
    (2, 3072, 320, 960, False), (2, 1536, 320, 320, False), (2, 768, 640, 2560, True),
    (0, 192, 1280, 3840, False), (2, 48, 1280, 5120, True),
])
def test_norm_matmul_operator_compiled(groups, m, k, n, geglu):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    g = max(groups, 1)
    width = 2 * n if geglu else n
    x = torch.randn(*((m, k) if groups == 0 else (g, m, k)), device=dev).half()
    w = ((torch.randn(width, k, device=dev) / k ** 0.5).half() if groups == 0
         else (torch.randn(g, k, width, device=dev) / k ** 0.5).half())
    vec = (k,) if groups == 0 else (g, k)
    nw, nb = torch.randn(*vec, device=dev).half(), torch.randn(*vec, device=dev).half()
    sh = torch.randn(*vec, device=dev)
    b = torch.randn(width if groups == 0 else (g, width), device=dev).half() if geglu else None
    layer = nm.NormLinear(nw, nb, 1e-5, w, b, sh, geglu)
    got = torch.compile(layer, fullgraph=True)(x)
    ref = plain(x.float(), w.float(), nw.float(), nb.float(), 1e-5, sh, None if b is None else b.float(), geglu)
    assert got.shape == ref.shape
    assert (got.float() - ref).abs().max().item() <= 3e-3 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("stacked", [False, True])
def test_pending_biases_give_back_the_whole_stream(stacked):
    """A stream kept without its biases, plus each shift, is the whole stream at every norm; proj_out of the bias-free
    stream plus proj_out_bias is proj_out of the whole one."""
    torch.manual_seed(0)
    lead = (2,) if stacked else ()
    c, c_out = 8, 6
    start = torch.randn(*lead, c)
    blocks = [tuple(torch.randn(*lead, c) for _ in range(3)), (torch.randn(*lead, c), None, torch.randn(*lead, c))]
    w_out, b_out = torch.randn(*lead, c, c_out), torch.randn(*lead, c_out)
    pending = nm.PendingBiases(start, blocks, w_out, b_out)
    whole = stream = torch.randn(*lead, 5, c)  # the stream as it enters block 0, proj_in's bias not yet added
    whole = whole + start[..., None, :]
    for i, biases in enumerate(blocks):
        for j, bias in enumerate(biases):
            torch.testing.assert_close(stream + pending.shift(i, j)[..., None, :], whole)
            update = torch.randn(*lead, 5, c)  # a projection's product, added to both streams
            stream, whole = stream + update, whole + update + (0 if bias is None else bias[..., None, :])
    got = stream @ w_out + pending.proj_out_bias[..., None, :]
    torch.testing.assert_close(got, whole @ w_out + b_out[..., None, :], rtol=1e-5, atol=1e-4)
    assert nm.PendingBiases(None, [(None, None, None)], w_out, b_out).shift(0, 0) is None

"""The Triton attention kernel computes F.scaled_dot_product_attention for the step's small shapes.

CPU: the kernel through Triton's interpreter, on the head sizes of SD1.5 (40, 80, 160) with query / key counts
that do not fill a block, and on the head-split views the step passes. GPU: the step's real shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import run_interpreted

ATTENTION_CHECK = r"""
import sys
import torch
import torch.nn.functional as F
from engines.torch_fast.triton_attention import attention
b, heads, tq, tk, d, strided = (int(v) for v in sys.argv[1:])
torch.manual_seed(0)
if strided:  # the step's layout: (B, T, heads*d) rows split into heads, a transposed view
    q = torch.randn(b, tq, heads * d).reshape(b, tq, heads, d).transpose(1, 2)
else:
    q = torch.randn(b, heads, tq, d)
k, v = torch.randn(b, heads, tk, d), torch.randn(b, heads, tk, d)
q, k, v = q.half(), k.half(), v.half()
got = attention(q, k, v)
ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
assert got.shape == ref.shape and got.dtype == torch.float16, (got.shape, got.dtype)
merged = got.transpose(1, 2).reshape(b, tq, heads * d)  # free: the output is laid out (B, T, heads, d)
assert merged.data_ptr() == got.data_ptr() and got.transpose(1, 2).is_contiguous()
print(((got.float() - ref).abs().max()).item())
"""


@pytest.mark.parametrize("b,heads,tq,tk,d,strided", [
    (2, 2, 24, 77, 160, 1),   # cross-attention at 4x6
    (2, 2, 96, 96, 160, 0),   # self-attention at 8x12
    (1, 3, 40, 40, 80, 1),    # a query count that does not fill a block
    (2, 1, 70, 77, 40, 1),    # two key blocks, the second partly masked
    (1, 2, 64, 128, 40, 1),   # keys filling whole blocks (no key mask)
    (1, 2, 32, 64, 80, 0),    # d = 80 as 64 + 16 columns
])
def test_triton_attention_equals_sdpa_interpreted(b, heads, tq, tk, d, strided):
    out = run_interpreted(ATTENTION_CHECK, [str(v) for v in (b, heads, tq, tk, d, strided)], timeout=600)
    assert float(out.strip().splitlines()[-1]) < 5e-3


def test_head_blocks_split_80_and_160_exactly_and_pad_the_rest():
    pytest.importorskip("triton")
    from engines.torch_fast.triton_attention import head_blocks

    assert [head_blocks(d) for d in (40, 80, 160, 64, 8, 24, 96)] == [
        (64, 0), (64, 16), (128, 32), (64, 0), (16, 0), (32, 0), (64, 32)]


def test_attention_rejects_mismatched_inputs():
    pytest.importorskip("triton")
    from engines.torch_fast.triton_attention import attention

    q = torch.randn(2, 8, 24, 40)
    with pytest.raises(ValueError, match="must be"):
        attention(q, torch.randn(2, 8, 77, 80), torch.randn(2, 8, 77, 80))
    with pytest.raises(ValueError, match="unit stride"):
        attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q)


SD15_ATTENTION = [(4, 8, 384, 384, 80), (2, 8, 96, 96, 160), (4, 8, 24, 77, 160), (2, 8, 1536, 77, 40),
                  (2, 8, 1536, 1536, 40)]


@pytest.mark.gpu
@pytest.mark.parametrize("b,heads,tq,tk,d", SD15_ATTENTION)
def test_triton_attention_matches_sdpa_on_sd15_shapes(b, heads, tq, tk, d):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engines.torch_fast.triton_attention import attention

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(b, heads, t, d, device="cuda", generator=g).half() for t in (tq, tk, tk))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (attention(q, k, v).float() - ref).abs().max().item() < 5e-3


def test_sdpa_keeps_cpu_and_large_calls_on_torch():
    pytest.importorskip("triton")
    from engines.torch_fast import triton_attention

    q = torch.randn(2, 8, 24, 40)
    assert not triton_attention.preferred(q, q)  # CPU tensors never take the Triton kernel
    torch.testing.assert_close(triton_attention.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q))
    # the threshold splits the step's calls where the timings do: every attention up to the twin's 16x24
    # self-attention (batch 4) here, the 32x48 self-attentions not (the Gluon kernel or cuDNN)
    assert 2 * 8 * 1536 * 1536 > triton_attention.MAX_PAIRS >= 4 * 8 * 384 * 384


@pytest.mark.gpu
def test_compiled_step_attention_uses_the_operator():
    """Inside torch.compile (as the step's parts run) `sdpa` on head-split views equals SDPA, for a call that takes
    the Triton operator and one that stays on cuDNN."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engines.torch_fast import triton_attention

    def block(x, w, kv):  # fused QKV rows -> heads, as parts._transformer does
        q, k, v = (x @ w).chunk(3, dim=-1)
        heads = [t.reshape(t.shape[0], t.shape[1], 8, -1).transpose(1, 2) for t in (q, k, v)]
        return triton_attention.sdpa(*heads), triton_attention.sdpa(heads[0], *kv)

    g = torch.Generator("cuda").manual_seed(0)
    for tokens, d in ((96, 160), (1536, 40)):
        x = torch.randn(2, tokens, 8 * d, device="cuda", generator=g).half()
        w = (torch.randn(8 * d, 3 * 8 * d, device="cuda", generator=g) / (8 * d) ** 0.5).half()
        kv = [torch.randn(2, 8, 77, d, device="cuda", generator=g).half() for _ in range(2)]
        got = torch.compile(block, fullgraph=True)(x, w, kv)
        q, k, v = (t.reshape(2, tokens, 8, d).transpose(1, 2) for t in (x @ w).chunk(3, dim=-1))
        refs = (F.scaled_dot_product_attention(q.float(), k.float(), v.float()),
                F.scaled_dot_product_attention(q.float(), kv[0].float(), kv[1].float()))
        for out, ref in zip(got, refs):
            assert (out.float() - ref).abs().max().item() < 5e-3

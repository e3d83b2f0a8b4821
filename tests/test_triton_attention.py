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
])
def test_triton_attention_equals_sdpa_interpreted(b, heads, tq, tk, d, strided):
    out = run_interpreted(ATTENTION_CHECK, [str(v) for v in (b, heads, tq, tk, d, strided)], timeout=600)
    assert float(out.strip().splitlines()[-1]) < 5e-3


def test_attention_rejects_mismatched_inputs():
    pytest.importorskip("triton")
    from engines.torch_fast.triton_attention import attention

    q = torch.randn(2, 8, 24, 40)
    with pytest.raises(ValueError, match="must be"):
        attention(q, torch.randn(2, 8, 77, 80), torch.randn(2, 8, 77, 80))
    with pytest.raises(ValueError, match="unit stride"):
        attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q)


SD15_ATTENTION = [(4, 8, 384, 384, 80), (2, 8, 96, 96, 160), (4, 8, 24, 77, 160), (2, 8, 1536, 77, 40)]


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

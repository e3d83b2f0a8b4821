"""The folded cross-attention (per-prompt A and B, `folded_cross`) computes diffusers' cross-attention.

CPU: fold + the torch reference against diffusers' Attention in fp32, shared query rows, the refusals; the Triton
kernel through the interpreter against the reference. GPU: the step's shapes in fp16.
"""

from __future__ import annotations

import pytest
import torch

from engines.torch_fast import folded_cross
from tests.triton_interpreter import run_interpreted


def _cross_attention(query_dim: int, context_dim: int, heads: int, head_dim: int, seed: int):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    attn = Attention(query_dim, cross_attention_dim=context_dim, heads=heads, dim_head=head_dim, bias=False)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.2)
    return attn.eval()


@pytest.mark.parametrize("query_dim,heads,head_dim,tokens", [(64, 2, 32, 24), (48, 3, 16, 70)])
def test_folded_cross_attention_equals_diffusers(query_dim, heads, head_dim, tokens):
    attn = _cross_attention(query_dim, 40, heads, head_dim, seed=tokens)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, tokens, query_dim, generator=g)
    context = torch.randn(2, folded_cross.TEXT_TOKENS, 40, generator=g)
    a, b = folded_cross.fold(attn, context)
    assert a.shape == (2, query_dim, heads * folded_cross.KEYS_PADDED)
    assert b.shape == (2, heads * folded_cross.KEYS_PADDED, query_dim)
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=context)
    ours = folded_cross.attend(x, a, b) + attn.to_out[0].bias
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_shared_query_rows_serve_consecutive_images():
    """x with fewer images than A: image i reads x[i // (NB // NX)] (the twin's shared first block)."""
    attn = _cross_attention(32, 24, 2, 16, seed=0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 10, 32, generator=g)
    a, b = folded_cross.fold(attn, torch.randn(4, folded_cross.TEXT_TOKENS, 24, generator=g))
    shared = folded_cross.attend(x, a, b)
    doubled = folded_cross.attend(x.repeat_interleave(2, dim=0), a, b)
    assert not torch.allclose(shared[0], shared[1])  # two texts, one query
    torch.testing.assert_close(shared, doubled, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot share"):
        folded_cross.scores_reference(torch.randn(3, 10, 32), a)


def test_fold_refuses_what_it_cannot_fold():
    attn = _cross_attention(32, 24, 2, 16, seed=0)
    with pytest.raises(ValueError, match="77 text tokens"):
        folded_cross.fold(attn, torch.randn(1, 64, 24))
    attn.to_q.bias = torch.nn.Parameter(torch.zeros(32))
    with pytest.raises(ValueError, match="bias-free"):
        folded_cross.fold(attn, torch.randn(1, folded_cross.TEXT_TOKENS, 24))


SCORES_CHECK = r"""
import sys
import torch
from engines.torch_fast import folded_cross
nx, nb, tokens, channels, heads = (int(v) for v in sys.argv[1:])
g = torch.Generator().manual_seed(0)
x = torch.randn(nx, tokens, channels, generator=g).half()
a = (torch.randn(nb, channels, heads * folded_cross.KEYS_PADDED, generator=g) / channels ** 0.5).half()
got = folded_cross.scores(x, a)
ref = folded_cross.scores_reference(x.float(), a.float())
assert got.shape == ref.shape and got.dtype == torch.float16, (got.shape, got.dtype)
pad = got.reshape(nb, tokens, heads, folded_cross.KEYS_PADDED)[..., folded_cross.TEXT_TOKENS:]
assert torch.all(pad == 0)
print((got.float() - ref).abs().max().item())
"""


@pytest.mark.parametrize("nx,nb,tokens,channels,heads", [
    (2, 4, 24, 128, 2),  # shared rows (X_SHARE 2), channels a multiple of BLOCK_K
    (2, 2, 70, 96, 1),   # a partial row block, channels not a multiple of BLOCK_K
])
def test_scores_kernel_equals_reference_interpreted(nx, nb, tokens, channels, heads):
    out = run_interpreted(SCORES_CHECK, [str(v) for v in (nx, nb, tokens, channels, heads)], timeout=600)
    assert float(out.strip().splitlines()[-1]) < 2e-3


# (NX, NB, tokens, channels): the step's cross-attentions, twin (4 images, 2 of them sharing the first block's rows)
# and decoder (2 images), 8 heads each
STEP_SHAPES = [(2, 4, 1536, 320), (4, 4, 1536, 320), (4, 4, 384, 640), (4, 4, 96, 1280), (4, 4, 24, 1280),
               (2, 2, 96, 1280), (2, 2, 384, 640), (2, 2, 1536, 320)]


@pytest.mark.gpu
@pytest.mark.parametrize("nx,nb,tokens,channels", STEP_SHAPES)
def test_scores_kernel_on_the_gpu(nx, nb, tokens, channels):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(nx, tokens, channels, device="cuda", generator=g).half()
    a = (torch.randn(nb, channels, 8 * folded_cross.KEYS_PADDED, device="cuda", generator=g) * 0.1).half()
    got = torch.ops.cnrt.folded_cross_scores(x, a)
    ref = folded_cross.scores_reference(x.float(), a.float())
    assert (got.float() - ref).abs().max().item() < 2e-3
    assert torch.equal(torch.ops.cnrt.folded_cross_scores(x, a), got)  # deterministic


def test_the_folds_are_part_of_the_artifact_key(monkeypatch):
    """A compiled package of one form cannot run the other (its inputs are A / B or K / V): the manifest key
    carries both folds, so switching either rebuilds."""
    from engines.torch_fast import residual_gemm
    from engines.torch_fast.runner import ConvKernels, StepLayout, step_settings

    def settings():
        return step_settings(ConvKernels.TUNED, StepLayout.TWIN, True)

    default = settings()
    assert default["folded_cross"] is True and default["folded_feed_forward"] is True
    monkeypatch.setattr(folded_cross, "ENABLED", False)
    assert settings() != default and settings()["folded_cross"] is False
    monkeypatch.setattr(folded_cross, "ENABLED", True)
    monkeypatch.setattr(residual_gemm, "FOLD_FF_PROJ_OUT", False)
    assert settings() != default

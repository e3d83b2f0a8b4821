"""exp2 with one exponential in every few on the FMA pipe (`fast_exp2`): the arithmetic's accuracy (CPU), the
attention kernel's machine code with it (CPU, compiled for an H100), and the kernel's results on the GPU."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engines.torch_fast import fast_exp2


@pytest.mark.parametrize("every", [2, 4])
def test_polynomial_lanes_are_within_a_sixth_of_fp16_half_ulp(every):
    """Over the softmax's inputs (-125 .. 0, and the slightly positive ones an FMA can leave), the polynomial's
    lanes are within 8e-5 of 2^x, the MUFU's within 1e-6; no NaN, no infinity."""
    x = torch.linspace(-125.0, 1e-3, 4_000_000 // every * every, dtype=torch.float32)
    got = fast_exp2.reference(x, every).double()
    ref = torch.exp2(x.double())
    rel = ((got - ref) / ref).abs().reshape(-1, every)
    assert rel[:, -1].max().item() < 8e-5
    assert rel[:, :-1].max().item() < 1e-6
    assert torch.isfinite(got).all()


def test_clamp_keeps_masked_and_tiny_inputs_normal():
    """-inf (a masked key) and inputs below -125 give 2^-125 on the polynomial's lane, not NaN or a wrapped
    exponent; 0 gives 1 within the fit."""
    x = torch.tensor([0.0, 0.0, 0.0, float("-inf"), 0.0, 0.0, 0.0, -300.0, 0.0, 0.0, 0.0, 0.0])
    got = fast_exp2.reference(x, 4)
    assert got[3].item() == got[7].item() == pytest.approx(2.0 ** -125, rel=1e-4)
    assert got[11].item() == pytest.approx(1.0, abs=8e-5)


@pytest.mark.parametrize("value,ok", [("0", True), ("4", True), ("2", True), ("3", False), ("x", False)])
def test_switch_is_checked(value, ok):
    env = dict(os.environ, CNRT_ATTENTION_EXP2_POLY=value)
    code = "import engines.torch_fast.fast_exp2 as f; print(f.POLY_EVERY)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if ok:
        assert done.returncode == 0 and done.stdout.strip() == value
    else:
        assert done.returncode != 0 and "CNRT_ATTENTION_EXP2_POLY" in done.stderr


def _attention_sass(exp2_poly):
    pytest.importorskip("triton")
    from engines.torch_fast import gluon_attention as ga

    if not ga.available():
        pytest.skip("this Triton has no Gluon")
    from bench import sass

    block_n, stages, pingpong, p_regs = ga.DEFAULT_CONFIG
    at_launch, consumer_regs = ga.registers()
    b, t, h, d = 2, 1536, 8, 40
    qkv = torch.empty(b, t, 3 * h * d, dtype=torch.float16)
    q, k, v = (x.reshape(b, t, h, d).transpose(1, 2) for x in qkv.chunk(3, dim=-1))
    args = dict(q_desc=ga._descriptor(q, 64), k_desc=ga._descriptor(k, block_n), v_desc=ga._descriptor(v, block_n),
                o_ptr=torch.empty(8, dtype=torch.float16), HEADS=h, TQ=t, TK=t, qk_scale=0.1)
    constexprs = dict(HEAD_D=d, BLOCK_N=block_n, STAGES=stages, CONSUMERS=ga.CONSUMERS, CONSUMER_REGS=consumer_regs,
                      PRODUCER_REGS=ga.PRODUCER_REGS, PINGPONG=bool(pingpong), P_REGS=bool(p_regs), PDL=2,
                      num_warps=4, EXP2_POLY=exp2_poly)
    return sass.summary(sass.sass(sass.compile_sm90(ga._attention_kernel, args, constexprs, num_warps=4,
                                                    maxnreg=at_launch)))


def test_gluon_attention_takes_a_quarter_of_its_exponentials_off_the_mufu():
    """Compiled for sm_90a, the default Gluon kernel with EXP2_POLY=4 has a quarter fewer MUFU.EX2 in its
    softmax (3 consumers x 64 scores a thread a block, plus the rows' rescaling factors), the same wgmmas, and
    no spills."""
    base, poly = _attention_sass(0), _attention_sass(4)
    mufu = "special functions (MUFU)"
    assert base[mufu] - poly[mufu] == 3 * 64 // 4
    assert base["wgmma"] == poly["wgmma"]
    assert poly.get("spill stores", 0) == 0 and poly.get("spill loads", 0) == 0


def _gpu_gluon():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    from engines.torch_fast import gluon_attention

    if not gluon_attention.available():
        pytest.skip("this Triton has no Gluon")
    return gluon_attention


@pytest.mark.gpu
@pytest.mark.parametrize("every", [2, 4])
@pytest.mark.parametrize("batch", [2, 4])
def test_gluon_attention_with_polynomial_exp2_matches_sdpa(batch, every):
    """On the step's 32x48 self-attention the kernel with the polynomial lanes stays as close to fp32 SDPA as
    with exp2 everywhere (within 1e-3 of it), and repeats its bytes."""
    ga = _gpu_gluon()
    from bench.gluon_attention import step_inputs

    q, k, v = step_inputs(batch, 1536, 40, 1, torch.Generator("cuda").manual_seed(3))[0]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = ga.attention(q, k, v, exp2_poly=every)
    base = ga.attention(q, k, v, exp2_poly=0)
    assert (out.float() - ref).abs().max().item() < 5e-3
    assert (out.float() - base.float()).abs().max().item() < 1e-3
    assert not torch.equal(out, base)  # the polynomial lanes did run
    assert torch.equal(out, ga.attention(q, k, v, exp2_poly=every))

"""The Gluon attention kernel: its machine code overlaps softmax and tensor cores (CPU, by compiling it for an
H100), and it computes F.scaled_dot_product_attention on the step's 32x48 self-attentions (GPU)."""

import os
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F


def _compiled(config):
    """(ptxas's report, SASS) of the kernel for sm_90a at the 32x48 self-attention (batch 2, d = 40)."""
    pytest.importorskip("triton")
    from engines.torch_fast import gluon_attention as ga

    if not ga.available():
        pytest.skip("this Triton has no Gluon")
    import triton
    from bench import sass

    block_n, stages, pingpong, p_regs = config
    at_launch, consumer_regs = ga.registers()
    b, t, h, d = 2, 1536, 8, 40
    qkv = torch.empty(b, t, 3 * h * d, dtype=torch.float16)
    q, k, v = (x.reshape(b, t, h, d).transpose(1, 2) for x in qkv.chunk(3, dim=-1))
    args = dict(q_desc=ga._descriptor(q, 64), k_desc=ga._descriptor(k, block_n), v_desc=ga._descriptor(v, block_n),
                o_ptr=torch.empty(8, dtype=torch.float16), HEADS=h, TQ=t, TK=t, qk_scale=0.1)
    constexprs = dict(HEAD_D=d, BLOCK_N=block_n, STAGES=stages, CONSUMERS=ga.CONSUMERS, CONSUMER_REGS=consumer_regs,
                      PRODUCER_REGS=ga.PRODUCER_REGS, PINGPONG=bool(pingpong), P_REGS=bool(p_regs), PDL=2,
                      num_warps=4)
    kernel = sass.compile_sm90(ga._attention_kernel, args, constexprs, num_warps=4, maxnreg=at_launch)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ptx = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gluon_attention_{os.getpid()}.ptx")
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    try:
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True,
                                text=True, check=True)
    finally:
        os.remove(ptx)
    return report.stdout + report.stderr, sass.sass(kernel)


@pytest.mark.parametrize("config", [(128, 2, 0, 1), (128, 2, 1, 1), (64, 4, 1, 0), (64, 4, 0, 0)])
def test_wgmmas_stay_asynchronous(config):
    """ptxas keeps the wgmmas asynchronous (no serialisation warning) in the default loop (P in registers) and the
    shared-memory one. In the latter the exponentials also come between the wait for the scores (one product still
    in flight) and the wait for the P V product: the softmax overlaps the tensor cores inside the warpgroup."""
    report, text = _compiled(config)
    assert "serialized" not in report and "C7514" not in report, report
    if config[3]:  # P in registers: each product is waited for at once, by design
        return
    lines = text.splitlines()
    waits = [(i, line) for i, line in enumerate(lines) if "WARPGROUP.DEPBAR.LE" in line]
    overlapped = False
    for (i, line), (j, nxt) in zip(waits, waits[1:]):
        if "gsb0, 0x1" in line and "gsb0, 0x0" in nxt:
            overlapped = overlapped or sum("MUFU.EX2" in x for x in lines[i:j]) >= 16
    assert overlapped, "no loop where the softmax's exp2 runs between the two wgmma waits"


def _step_inputs(batch, seed=0):
    from bench.gluon_attention import step_inputs

    return step_inputs(batch, 1536, 40, 1, torch.Generator("cuda").manual_seed(seed))[0]


def _gpu_kernel():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    from engines.torch_fast import gluon_attention

    if not gluon_attention.available():
        pytest.skip("this Triton has no Gluon")
    return gluon_attention


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("config", [(128, 2, 0, 1), (128, 2, 1, 1), (64, 4, 1, 0), (64, 4, 0, 1)])
def test_gluon_attention_matches_sdpa_and_repeats(batch, config):
    ga = _gpu_kernel()
    q, k, v = _step_inputs(batch)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = ga.attention(q, k, v, config=config)
    assert out.shape == ref.shape and out.transpose(1, 2).is_contiguous()
    assert (out.float() - ref).abs().max().item() < 5e-3
    assert torch.equal(out, ga.attention(q, k, v, config=config))


@pytest.mark.gpu
def test_sdpa_routes_the_32x48_self_attention_when_switched_on(monkeypatch):
    """With CNRT_GLUON_ATTENTION's switch on, `triton_attention.sdpa` sends the step's 32x48 self-attention to the
    Gluon operator, also inside torch.compile, and the result equals SDPA's; inputs it cannot take go elsewhere."""
    ga = _gpu_kernel()
    from engines.torch_fast import triton_attention

    monkeypatch.setattr(ga, "ENABLED", True)
    q, k, v = _step_inputs(2, seed=1)
    assert ga.preferred(q, k, v) and not triton_attention.preferred(q, k)
    assert not ga.preferred(q.contiguous(), k.contiguous(), v.contiguous())  # not (B*T, H, d) rows
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (triton_attention.sdpa(q, k, v).float() - ref).abs().max().item() < 5e-3

    def block(x, w):
        heads = [t.reshape(2, 1536, 8, 40).transpose(1, 2) for t in (x @ w).chunk(3, dim=-1)]
        return triton_attention.sdpa(*heads)

    g = torch.Generator("cuda").manual_seed(2)
    x = torch.randn(2, 1536, 320, device="cuda", generator=g).half()
    w = (torch.randn(320, 960, device="cuda", generator=g) / 320 ** 0.5).half()
    got = torch.compile(block, fullgraph=True)(x, w)
    q, k, v = (t.reshape(2, 1536, 8, 40).transpose(1, 2) for t in (x @ w).chunk(3, dim=-1))
    assert (got.float() - F.scaled_dot_product_attention(q.float(), k.float(), v.float())).abs().max() < 5e-3


@pytest.mark.parametrize("value,ok", [("128,2,1,1", True), ("1,2", False), ("96,2,1,1", False), ("128,1,1,1", False)])
def test_config_switch_is_checked(value, ok):
    """CNRT_GLUON_ATTENTION_CONFIG is read at import: a good value becomes the default, a bad one fails clearly."""
    import sys

    env = dict(os.environ, CNRT_GLUON_ATTENTION_CONFIG=value)
    code = "import engines.torch_fast.gluon_attention as g; print(g.DEFAULT_CONFIG)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if ok:
        assert done.returncode == 0 and done.stdout.strip() == str(tuple(int(v) for v in value.split(",")))
    else:
        assert done.returncode != 0 and "CNRT_GLUON_ATTENTION_CONFIG" in done.stderr

"""Programmatic dependent launch (engines/torch_fast/pdl.py): off where it cannot work; on a Hopper GPU, our kernels
launched with it (and their weight prefetches) between Inductor's (PDL on too, every kernel waiting before its first
access: `compile.wait_before_first_access`), replayed in one CUDA graph, give the bytes of plain launches.

PDL changes when a kernel may start, never what it computes, so the only acceptable difference is none: a kernel
that read its input before the one writing it had finished would show up as different bytes in some replay.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.torch_fast import pdl


def test_off_unless_requested(monkeypatch):
    monkeypatch.setattr(pdl, "REQUESTED", False)
    assert not pdl.enabled(torch.device("cpu"))
    if torch.cuda.is_available():
        assert not pdl.enabled(torch.device("cuda"))


def test_off_on_cpu_and_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(pdl, "REQUESTED", True)
    assert not pdl.enabled(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if torch.cuda.is_available():
        assert not pdl.enabled(torch.device("cuda"))


def _launched_with_pdl(kernel) -> bool:
    """Whether any compiled variant of a @triton.jit kernel carries the PDL launch flag."""
    return any(getattr(k.metadata, "launch_pdl", False)
               for cache in kernel.device_caches.values() for k in cache[0].values())


@pytest.mark.gpu
def test_a_pdl_chain_replayed_in_a_cuda_graph_gives_the_bytes_of_plain_launches(monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    import torch._inductor.config as inductor_config
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.utils import run_and_get_code

    from engines.torch_fast.compile import wait_before_first_access

    from engines.torch_fast import triton_attention, triton_conv, triton_geglu
    from engines.torch_fast.triton_conv import candidate_configs, tma_candidate_configs

    torch.manual_seed(0)
    n, c, h, w, heads = 2, 320, 32, 48, 8
    dev = torch.device("cuda")
    x = torch.randn(n, c, h, w, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w1, w2 = (triton_conv.weight_matrix(torch.randn(c, c, 3, 3, device=dev, dtype=torch.float16) * 0.02)
              for _ in range(2))
    b1, b2 = (torch.randn(c, device=dev, dtype=torch.float16) * 0.1 for _ in range(2))
    gather_split = next(cf for cf in candidate_configs(n * h * w, c, c, 3) if cf.split_k > 1)
    tma_whole = next(cf for cf in tma_candidate_configs(n, h, w, c, c, 3) if cf.split_k == 1)
    tma_split = next(cf for cf in tma_candidate_configs(n, h, w, c, c, 3) if cf.split_k > 1)
    w_ff = torch.randn(2 * 1280, c, device=dev, dtype=torch.float16) * 0.05
    b_ff = torch.randn(2 * 1280, device=dev, dtype=torch.float16) * 0.1

    def chain(x):
        y = F.silu(triton_conv.conv2d_nhwc(x, w1, b1, 3, 1, 1, gather_split))  # partials summed by Inductor
        y = triton_conv.conv2d_nhwc(y, w2, b2, 3, 1, 1, tma_whole, residual=x)
        y = triton_conv.conv2d_nhwc(F.silu(y), w2, None, 3, 1, 1, tma_split, fixup=True)
        t = y.permute(0, 2, 3, 1).reshape(n, h * w, c)
        q = t.view(n, h * w, heads, c // heads).transpose(1, 2)
        a = torch.ops.cnrt.triton_attention(q, q * 0.5, q).transpose(1, 2).reshape(n, h * w, c)
        return triton_geglu.geglu(a + t, w_ff, b_ff).float().sum(-1)

    def captured(replays: int) -> list[torch.Tensor]:
        torch._dynamo.reset()
        compiled = torch.compile(chain, fullgraph=True, dynamic=False)
        compiled(x)  # compiles, autotunes and makes the counter buffer outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(x)
        results = []
        for _ in range(replays):
            graph.replay()
            results.append(out.clone())
        torch.cuda.synchronize()
        return results

    monkeypatch.setattr(pdl, "REQUESTED", False)
    plain = captured(1)[0]
    monkeypatch.setattr(pdl, "REQUESTED", True)
    monkeypatch.setattr(TritonKernel, "_handle_pdl_before_access", wait_before_first_access)
    with inductor_config.patch({"triton.enable_pdl": True, "fx_graph_cache": False}):
        with_pdl = captured(50)
        torch._dynamo.reset()
        _, sources = run_and_get_code(torch.compile(chain, fullgraph=True, dynamic=False), x)
    torch._dynamo.reset()
    kernels = [k for src in sources for k in src.split("@triton.jit")[1:]]
    assert kernels and all("gdc_wait()" in k for k in kernels), "an Inductor kernel does not wait before it reads"
    for i, out in enumerate(with_pdl):
        assert torch.equal(out, plain), f"replay {i} differs from the plain launches"
    for kernel in (triton_conv._conv_nhwc_kernel, triton_conv._conv_tma_kernel, triton_attention._attention_kernel,
                   triton_geglu._geglu_tma_kernel):
        assert _launched_with_pdl(kernel), kernel

"""The grouped zero-convolution GEMM computes what the separate 1x1 convolutions compute.

CPU: the kernel through Triton's interpreter (problems of different K, N and row counts, rows that do not fill a
tile, outputs as channels_last views of one buffer), the launch plan, and the fallback and errors. GPU: the SD1.5
step's 13 shapes through the operator inside torch.compile, and a CUDA graph's replays.
"""

from __future__ import annotations

import pytest
import torch

from engines.torch_fast import zero_convs
from engines.torch_fast.zero_convs import Plan, TileConfig, ZeroConvs
from tests.triton_interpreter import run_interpreted

KERNEL_CHECK = r"""
import torch
from engines.torch_fast import zero_convs as Z
torch.manual_seed(0)
shapes = [(2, 64, 8, 12), (2, 128, 4, 6), (1, 64, 3, 5)]  # K 64 / 128; 192, 48 and 15 rows
outs = [128, 64, 128]
convs = [torch.nn.Conv2d(s[1], o, 1) for s, o in zip(shapes, outs)]
xs = [torch.randn(*s).contiguous(memory_format=torch.channels_last) for s in shapes]
m = Z.ZeroConvs(convs, Z.TileConfig(block_m=32, block_n=64, num_warps=4, num_stages=1))
flat = Z.grouped_matmul([Z._rows(x) for x in xs], m.weights(), m.biases(), m.cfg)
got = Z._output_views(flat, [(x.shape[0], o, x.shape[2], x.shape[3]) for x, o in zip(xs, outs)])
assert flat.numel() == sum(x.shape[0] * x.shape[2] * x.shape[3] * o for x, o in zip(xs, outs))
for g, x, c in zip(got, xs, convs):
    ref = c(x)
    assert g.shape == ref.shape and g.is_contiguous(memory_format=torch.channels_last)
    print((g - ref).abs().max().item())
"""


def test_grouped_kernel_equals_convolutions_interpreted():
    out = run_interpreted(KERNEL_CHECK, [], timeout=600)
    errors = [float(v) for v in out.strip().splitlines()]
    assert len(errors) == 3 and max(errors) < 1e-4


def test_plan_puts_the_longest_k_first_and_packs_outputs_in_caller_order():
    plan = Plan.of(rows=(3072, 48, 768), k=(320, 1280, 640), n=(320, 1280, 640), cfg=TileConfig(64, 64, 4, 3))
    assert plan.order == (1, 2, 0)
    # tiles: 1 x 20 (48 rows, 1280 cols), 12 x 10, 48 x 5
    assert plan.tile_starts == (0, 20, 140, 380)
    assert plan.out_offsets == (0, 3072 * 320, 3072 * 320 + 48 * 1280)
    assert plan.total_out == 3072 * 320 + 48 * 1280 + 768 * 640


def test_falls_back_to_convolutions_off_cuda():
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(64, 64, 1), torch.nn.Conv2d(128, 128, 1)]
    xs = [torch.randn(2, 64, 4, 6), torch.randn(2, 128, 2, 3)]
    got = ZeroConvs(convs)(xs)
    for g, x, c in zip(got, xs, convs):
        torch.testing.assert_close(g, c(x))


def test_rejects_what_it_cannot_tile():
    assert not zero_convs.can_group([torch.nn.Conv2d(64, 64, 3)])
    assert not zero_convs.can_group([torch.nn.Conv2d(48, 64, 1)])  # K not a multiple of 64
    assert not zero_convs.can_group([torch.nn.Conv2d(64, 64, 1, bias=False)])
    with pytest.raises(ValueError, match="1x1"):
        ZeroConvs([torch.nn.Conv2d(64, 64, 3)])
    with pytest.raises(ValueError, match="expected 1 inputs"):
        ZeroConvs([torch.nn.Conv2d(64, 64, 1)])([torch.randn(1, 64, 2, 2)] * 2)
    with pytest.raises(ValueError, match="do not chain"):
        zero_convs.grouped_matmul([torch.randn(4, 64)], [torch.randn(128, 64)], [torch.randn(64)])


def test_tile_config_from_environment(monkeypatch):
    monkeypatch.setenv("CNRT_ZERO_CONV_TILE", "128,64,8,4")
    assert TileConfig.from_env() == TileConfig(128, 64, 8, 4)
    monkeypatch.setenv("CNRT_ZERO_CONV_TILE", "big")
    with pytest.raises(ValueError, match="CNRT_ZERO_CONV_TILE"):
        TileConfig.from_env()


# The SD1.5 ControlNet's 13 zero convolutions at 256x384, CFG batch 2: (channels, h, w).
SD15_ZERO_CONVS = [(320, 32, 48)] * 3 + [(320, 16, 24), (640, 16, 24), (640, 16, 24), (640, 8, 12),
                                         (1280, 8, 12), (1280, 8, 12)] + [(1280, 4, 6)] * 4


@pytest.mark.gpu
def test_sd15_zero_convs_compiled_and_replayed():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator("cuda").manual_seed(0)
    convs = [torch.nn.Conv2d(c, c, 1).cuda().half() for c, _, _ in SD15_ZERO_CONVS]
    xs = [torch.randn(2, c, h, w, device="cuda", generator=g).half().contiguous(memory_format=torch.channels_last)
          for c, h, w in SD15_ZERO_CONVS]
    module = ZeroConvs(convs)
    compiled = torch.compile(module, fullgraph=True)
    got = compiled(xs)
    for out, x, c in zip(got, xs, convs):
        ref = torch.nn.functional.conv2d(x.float(), c.weight.float(), c.bias.float())
        assert out.shape == ref.shape
        assert (out.float() - ref).abs().max().item() < 2e-2 * max(1.0, ref.abs().max().item() / 8)
    first = [o.clone() for o in got]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        module(xs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = module(xs)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(first, replayed))

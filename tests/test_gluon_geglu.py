"""bench.gluon_geglu: the Gluon ping-pong GEGLU compiles for an H100 without a GPU, and computes the step's GEGLU.

CPU: compiled for sm90 (both weight layouts, 4- and 8-warp consumers): a cubin within an H100's shared memory, with
the warp-specialized register split (setmaxnreg) and wgmma in its PTX; shapes it does not take are refused.
GPU: on a twin (stacked weights) and a decoder (Linear weights) shape, its result against the step's Triton kernel.
"""

from __future__ import annotations

import pytest
import torch

gg = pytest.importorskip("bench.gluon_geglu")

H100_SHARED_BYTES = 232448  # the most shared memory one block may use


@pytest.mark.parametrize("w_kn,config", [(True, (128, 64, 6, 4, 1, 1)), (False, (128, 64, 4, 8, 2, 1)),
                                           (True, (128, 64, 6, 4, 1, 0))],
                         ids=["stacked-4warp-1ring", "linear-8warp-2rings", "stacked-direct-store"])
def test_compiles_for_sm90_without_a_gpu(w_kn, config):
    if gg.gluon is None:
        pytest.skip("needs Triton with Gluon")
    compiled = gg.compile_sm90(w_kn, config)
    assert len(compiled.asm["cubin"]) > 0
    assert 0 < compiled.metadata.shared <= H100_SHARED_BYTES
    ptx = compiled.asm["ptx"]
    assert "setmaxnreg" in ptx and "wgmma.mma_async" in ptx


def test_register_split_fits_the_register_file():
    for warps in (4, 8):
        at_launch, consumer, producer = gg.registers(warps)
        groups = 2 * warps // 4 + 1
        assert at_launch * groups * 128 <= 65536  # what the launch reserves
        assert (2 * consumer * (warps // 4) + producer) * 128 <= at_launch * groups * 128  # after setmaxnreg
        assert consumer % 8 == 0 and producer % 8 == 0


def test_refuses_what_it_does_not_take():
    x, weight = torch.randn(4, 64).half(), torch.randn(256, 64).half()
    assert not gg.fits_gluon(x, weight)  # a CPU tensor
    with pytest.raises(ValueError, match="does not take"):
        gg.geglu_ws(x, weight, None)


@pytest.mark.gpu
@pytest.mark.parametrize("groups,rows,k,n_out", [(2, 384, 320, 256), (1, 200, 640, 512)])
def test_equals_the_step_kernel_on_gpu(groups, rows, k, n_out):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engines.torch_fast import triton_geglu as tg

    torch.manual_seed(0)
    dev = torch.device("cuda")
    if groups == 2:
        x = torch.randn(groups, rows, k, device=dev).half()
        weight = (torch.randn(groups, k, 2 * n_out, device=dev) / k ** 0.5).half()
        bias = torch.randn(groups, 2 * n_out, device=dev).half()
    else:
        x = torch.randn(rows, k, device=dev).half()
        weight = (torch.randn(2 * n_out, k, device=dev) / k ** 0.5).half()
        bias = torch.randn(2 * n_out, device=dev).half()
    got = gg.geglu_ws(x, weight, bias)
    ref = tg.reference(x.float(), weight.float(), bias.float())
    assert got.shape == ref.shape
    assert ((got.float() - ref).norm() / ref.norm()).item() < 3e-3
    torch.testing.assert_close(got, tg.geglu_linear_tma(x, weight, bias), atol=2e-3, rtol=2e-3)

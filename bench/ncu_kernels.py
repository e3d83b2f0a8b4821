"""`python3 -m bench.ncu_kernels KERNEL`: launch one of the step's kernels a few times, alone, for Nsight Compute.

Why: the loop's kernels have been timed (CUDA events, graph replays, profiler sequences) but never read through
hardware counters. Whether, say, the twin's 32x48 GEGLU is bound by L2 traffic (its 128x64 tiles re-read A and W
from L2: about 154 MB a call, 4.7 TB/s at 32.7 us), by its epilogue, or by the tensor pipe is a counter question.
On the device's Firecracker machines `ncu` reads the counters (pass `--clock-control none`; KINDS.md). Run as:

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --launch-skip 3 --launch-count 1 -k regex:'<kernel name>' python3 -m bench.ncu_kernels geglu

`bash tools/ncu_kernels.sh OUTDIR [KERNEL ...]` runs that for each kernel with the metrics of the eighteenth
session (time, SM / L2 / DRAM throughput and bytes, tensor-pipe activity, warps active, registers, warp stall
reasons) and prints a summary.

Each KERNEL is launched WARMUP + 1 times on the step's shape, with the step's config, so `--launch-skip 3
--launch-count 1` profiles one warm launch (the first launches compile). `--list` prints the choices and the
kernel-name pattern of each. The step's switches apply (e.g. CNRT_GEGLU_EARLY_BIAS=0 for the GEGLU kernel with
its biases added in the epilogue, the form before the nineteenth session).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

WARMUP = 3


def conv_8x12_config():
    """The H100 table's config for the decoder's 8x12 ResNet conv 2x1280x8x12 -> 1280: 64x128 tiles, split 6, 5
    stages, box 2x8x4 (`bench.sass conv-tma` compiles the kernel with it too)."""
    from engines.torch_fast.triton_conv import ConvConfig

    return ConvConfig(block_m=64, block_n=128, block_k=64, split_k=6, num_warps=4, num_stages=5, box=(2, 8, 4))


def _twin_geglu_inputs():
    """One (x, stacked weight, bias) set of the twin's 32x48 GEGLU shape, as `bench.geglu_kernels` makes them."""
    from bench.geglu_kernels import _inputs

    xs, ws, bs = _inputs(2, 3072, 320, 1280)
    return xs[0], ws[0], bs[0]


def _geglu(dev):
    """The twin's 32x48 GEGLU (2 x 3072 x 320 -> 1280, stacked weights) on the step's Triton kernel and tile."""
    from engines.torch_fast import triton_geglu as tg

    x, w, b = _twin_geglu_inputs()
    return lambda: tg.geglu_linear_tma(x, w, b, (128, 64, 4, 3))


def _gluon_geglu(dev):
    """The same shape on the Gluon ping-pong probe (`bench.gluon_geglu`, its default config)."""
    from bench import gluon_geglu as gg

    x, w, b = _twin_geglu_inputs()
    return lambda: gg.geglu_ws(x, w, b)


def _qkv(batch):
    """One set of the 32x48 self-attention's (q, k, v) at `batch`, as `bench.gluon_attention` makes them."""
    from bench.gluon_attention import step_inputs

    return step_inputs(batch, 1536, 40, 1)[0]


def _attention_triton(dev):
    """The decoder's 32x48 self-attention (batch 2, 8 heads of 40) on the step's Triton kernel."""
    from engines.torch_fast import triton_attention as ta

    q, k, v = _qkv(2)
    return lambda: ta.attention(q, k, v)


def _attention_gluon(dev):
    """The same attention on the Gluon kernel (`engines/torch_fast/gluon_attention.py`, its default config)."""
    from engines.torch_fast import gluon_attention as ga

    q, k, v = _qkv(2)
    return lambda: ga.attention(q, k, v)


def _attention_cudnn(dev):
    """The same attention on cuDNN, as the step runs it."""
    q, k, v = _qkv(2)
    return lambda: F.scaled_dot_product_attention(q, k, v)


def _gemm_8x12(dev):
    """A deep GEMM of the decoder's 8x12 transformers on cuBLAS: 192 x 1280 @ 1280 x 1280."""
    a = torch.randn(192, 1280, device=dev, dtype=torch.float16)
    w = torch.randn(1280, 1280, device=dev, dtype=torch.float16)
    return lambda: a @ w


def _conv_8x12(dev):
    """The decoder's 8x12 ResNet conv 2x1280x8x12 -> 1280 on the step's Triton TMA kernel, with the H100 table's
    config (`conv_8x12_config`; the kernel writes fp32 partials)."""
    from engines.torch_fast import triton_conv

    x = torch.randn(2, 1280, 8, 12, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
    w = triton_conv.weight_matrix(torch.randn(1280, 1280, 3, 3, device=dev, dtype=torch.float16) * 0.01)
    return lambda: triton_conv.conv2d_nhwc(x, w, None, 3, 1, 1, conv_8x12_config(), fixup=False)


def _conv_32x48(dev):
    """The decoder's 32x48 conv 2x960x32x48 -> 320 on the cuDNN graph-API engine config the H100 table chose
    (`cudnn_conv.run`; needs the cudnn-frontend package)."""
    from engines.torch_fast import cudnn_conv

    x = torch.randn(2, 960, 32, 48, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
    w = (torch.randn(320, 960, 3, 3, device=dev, dtype=torch.float16) * 0.01).to(memory_format=torch.channels_last)
    return lambda: cudnn_conv.run(x, w, 1, "eng62_k2=18_k13=1_k18=0_k25=1_k27=8_k28=1")


# name -> (what builds the launch, a regular expression for ncu's -k)
KERNELS = {
    "geglu": (_geglu, "_geglu_tma_kernel"),
    "gluon-geglu": (_gluon_geglu, "_geglu_ws_kernel"),
    "attention-triton": (_attention_triton, "_attention_kernel"),
    "attention-gluon": (_attention_gluon, "_attention_kernel"),
    "attention-cudnn": (_attention_cudnn, "sdpa"),
    "gemm-8x12": (_gemm_8x12, "nvjet|gemm"),
    "conv-8x12": (_conv_8x12, "_conv_tma_kernel"),
    "conv-32x48": (_conv_32x48, "xmma_fprop|conv"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel", nargs="?", choices=sorted(KERNELS))
    p.add_argument("--list", action="store_true", help="print each kernel's name pattern for ncu's -k")
    a = p.parse_args(argv)
    if a.list or a.kernel is None:
        for name, (make, pattern) in KERNELS.items():
            print(f"{name:<18} -k regex:'{pattern}'  {make.__doc__.splitlines()[0]}")
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    launch = KERNELS[a.kernel][0](torch.device("cuda"))
    with torch.no_grad():
        for _ in range(WARMUP + 1):
            launch()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())

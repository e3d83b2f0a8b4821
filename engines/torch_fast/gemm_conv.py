"""Convolution layers that replace the step's nn.Conv2d where cuDNN is slower, and the swap itself.

At 256x384 the step's convolutions are small GEMMs (M = 48..3072 rows for CFG batch 2). Measured per layer on an
H200 (bench/NOTES.md, `python3 -m bench.layer_shapes`):
- 1x1 convolutions of a channels_last map are plain matmuls: cuBLAS took 4-7 us where cuDNN took 6-10 us.
  `GemmConv2d` does that (and, for kxk, im2col + matmul, kept for experiments: its gather kernel cost more in the
  whole step than the matmul saved).
- 3x3 convolutions: the Triton implicit-GEMM kernel (`triton_conv`), with per-shape tiles and split-K chosen by
  `conv_tuning`, where it beat cuDNN. `TritonConv2d` runs it. Where one of cuDNN's graph-API engine configs won
  the tuning instead, `CudnnGraphConv2d` runs that config (`cudnn_conv`).
All compute exactly Conv2d's function with the same weights (reordered once into (kh*kw*Cin, Cout) for the Triton
and GEMM layers, KRSC for cuDNN).
`convert_convolutions` swaps them in, using input sizes recorded from one forward pass.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch_fast import cudnn_conv, triton_conv
from engines.torch_fast.triton_conv import ConvConfig


def _weight_matrix(conv: nn.Conv2d) -> nn.Parameter:
    return nn.Parameter(triton_conv.weight_matrix(conv.weight.detach()), requires_grad=False)


def _is_plain(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros" \
        and not isinstance(conv.padding, str)


def _check_plain(conv: nn.Conv2d) -> None:
    if not _is_plain(conv):
        raise ValueError(f"only plain convolutions (groups=1, dilation=1, numeric zero padding) can be swapped: {conv}")


def _check_square(conv: nn.Conv2d, swap: str) -> None:
    """A plain Conv2d with the same kernel size, stride and padding along both axes: what the kernels that take one
    number for each (`TritonConv2d`, `CudnnGraphConv2d`) compute."""
    _check_plain(conv)
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1] \
            or conv.padding[0] != conv.padding[1]:
        raise ValueError(f"{swap} needs a square kernel, stride and padding: {conv}")


class GemmConv2d(nn.Module):
    """A Conv2d (groups=1, dilation=1, zero padding) computed as im2col + one matmul.

    The weight is stored as (kh*kw*Cin, Cout), columns ordered (kernel row, kernel column, input channel), which
    is the order `gemm_conv2d` lays out the shifted views: the output rows come out as (N*H*W, Cout), i.e. channels_last.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        _check_plain(conv)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.weight = _weight_matrix(conv)  # (kh*kw*Cin, Cout)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm_conv2d(x, self.weight, self.bias, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


class TritonConv2d(nn.Module):
    """A square-kernel Conv2d computed by the Triton implicit-GEMM kernel with one tuned config."""

    def __init__(self, conv: nn.Conv2d, config: ConvConfig):
        super().__init__()
        _check_square(conv, "TritonConv2d")
        if not triton_conv.supports(conv.in_channels, conv.kernel_size[0], config, stride=conv.stride[0]):
            raise ValueError(f"config {config} does not fit {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel, self.stride, self.padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        self.config = config
        self.weight = _weight_matrix(conv)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return triton_conv.conv2d_nhwc(x, self.weight, self.bias, self.kernel, self.stride, self.padding, self.config)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}, {self.config}")


class CudnnGraphConv2d(nn.Module):
    """A square-kernel Conv2d on one cuDNN graph-API engine config; its bias is added after (in fp32, one rounding),
    where torch.compile fuses it into the next kernel."""

    def __init__(self, conv: nn.Conv2d, plan: str):
        super().__init__()
        _check_square(conv, "CudnnGraphConv2d")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel, self.stride, self.padding, self.plan = conv.kernel_size[0], conv.stride[0], conv.padding[0], plan
        self.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cudnn_conv.conv2d(x, self.weight, self.padding, self.plan, self.stride)
        return y if self.bias is None else cudnn_conv.with_bias(y, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}, cuDNN {self.plan}")


def gemm_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None", kernel_size: tuple[int, int],
                stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """conv2d(x) with weight as (kh*kw*Cin, Cout) rows ordered (kernel row, kernel column, input channel).

    im2col is Tensor.unfold views of the zero-padded NHWC map copied once into (N*oh*ow, kh*kw*Cin); a 1x1
    stride-1 convolution of a channels_last map needs no copy at all. (On an H200 the unfold copy beat a cat of
    the kh*kw shifted views, which Inductor splits into one copy kernel per view: bench/NOTES.md.)
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    rows = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view for channels_last input
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        out_h, out_w, cols = h, w, rows.reshape(n * h * w, c)
    else:
        if ph or pw:
            rows = F.pad(rows, (0, 0, pw, pw, ph, ph))
        patches = rows.unfold(1, kh, sh).unfold(2, kw, sw)  # (N, oh, ow, C, kh, kw)
        out_h, out_w = patches.shape[1], patches.shape[2]
        cols = patches.permute(0, 1, 2, 4, 5, 3).reshape(n * out_h * out_w, kh * kw * c)
    out = cols @ weight if bias is None else torch.addmm(bias, cols, weight)
    return out.reshape(n, out_h, out_w, weight.shape[1]).permute(0, 3, 1, 2)  # NCHW view of channels_last memory


def record_input_sizes(roots: Iterable[nn.Module], run: Callable[[], object]) -> dict[nn.Conv2d, tuple[int, ...]]:
    """Input shape of every Conv2d under the roots that run() calls."""
    sizes: dict[nn.Conv2d, tuple[int, ...]] = {}

    def remember(module, args) -> None:  # a pre-hook that returns something replaces the arguments
        sizes.setdefault(module, tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(remember)
             for root in roots for m in root.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return sizes


def convert_convolutions(roots: Iterable[nn.Module], sizes: dict[nn.Conv2d, tuple[int, ...]],
                         replacement: Callable[[nn.Conv2d, tuple[int, ...]], "nn.Module | None"]) -> int:
    """Replace, in place, every recorded Conv2d child for which replacement(conv, input_shape) gives a module;
    returns how many were replaced."""
    replaced = 0
    for root in roots:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d) and child in sizes:
                    new = replacement(child, sizes[child])
                    if new is not None:
                        setattr(parent, name, new)
                        replaced += 1
    return replaced


def is_wide(conv: nn.Conv2d, min_channels: int = 64) -> bool:
    """The convolutions worth swapping: >= min_channels in and out (the networks' conv_in / conv_out, with 4
    channels on one side, stay on cuDNN) and plain."""
    return _is_plain(conv) and min(conv.in_channels, conv.out_channels) >= min_channels


def triton_candidate(conv: nn.Conv2d, min_in_channels: int = 64) -> bool:
    """The kxk convolutions offered to the Triton kernel (the tuner then picks it or cuDNN): plain, with >= 64 input
    channels, any number of output channels. The UNet's conv_out (320 -> 4) is one: cuDNN pads its 4 channels to 8
    in two extra kernels and a memset."""
    return _is_plain(conv) and conv.kernel_size != (1, 1) and conv.in_channels >= min_in_channels


def pointwise_as_matmul(conv: nn.Conv2d, shape: tuple[int, ...]) -> "nn.Module | None":
    """Replacement rule: wide 1x1 stride-1 convolutions become matmuls."""
    if is_wide(conv) and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
        return GemmConv2d(conv)
    return None

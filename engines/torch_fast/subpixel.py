"""The decoder's upsamplers, conv3x3(nearest_2x(x)), as one 2x2 convolution of x and a depth-to-space gather.

Why: each UNet up block but the last ends with an Upsample2D: a nearest 2x upsampling, then a 3x3 convolution at
the doubled size. Every output pixel's 3x3 window over the upsampled map covers only 2x2 pixels of x, and which
taps fall on the same pixel depends only on the output pixel's parity (py, px). So the same numbers come from four
2x2 convolutions of x, one per parity, whose weights are sums of the 3x3 weights: 16 multiply-adds per input
channel and output pixel instead of 36. The four run as ONE convolution with 4 * Cout output channels (kernel 2,
padding 1: output (H+1, W+1)); output pixel (2i + py, 2j + px) is channel block 2 * py + px at (i + py, j + px).
The upsampled map is never written, and the gather is a view chain Inductor folds into the consumer (the next
block's concatenation with its skip).

Numerics: the combined weights are summed in fp32 and rounded once to the model's dtype; the products are the
same terms as before, accumulated in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from profiles.config import env_flag

ENABLED = env_flag("CNRT_SUBPIXEL_UPSAMPLE", True)  # 0: interpolate, then the 3x3 convolution (A/B measurements)

# Tap sums per axis: row a of _TAPS[p] says which of the three 3x3 taps land on 2x2 tap a for output parity p.
_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)


def can_convert(up: nn.Module) -> bool:
    """A diffusers Upsample2D that `parts.UNetDecoder` runs as F.interpolate(nearest, 2x) + a 3x3 'same' conv."""
    conv = getattr(up, "conv", None)
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not getattr(up, "use_conv_transpose", False))


def subpixel_convolution(conv: nn.Conv2d) -> nn.Conv2d:
    """The 2x2, padding-1 convolution with 4 * Cout channels (parity blocks 00, 01, 10, 11) computing
    conv(nearest_2x(x)) for a 3x3 'same' conv."""
    w = conv.weight.detach().to(torch.float64)  # (Cout, Cin, 3, 3)
    blocks = [torch.einsum("ay,bx,oiyx->oiab", _TAPS[py].to(w.device), _TAPS[px].to(w.device), w)
              for py in (0, 1) for px in (0, 1)]
    out = nn.Conv2d(conv.in_channels, 4 * conv.out_channels, 2, padding=1, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat(blocks).to(conv.weight.dtype))
        if conv.bias is not None:
            out.bias.copy_(conv.bias.detach().repeat(4))
    out.requires_grad_(False)
    return out


def depth_to_space(y: torch.Tensor) -> torch.Tensor:
    """(N, 4C, H+1, W+1), channel block 2 * py + px -> (N, C, 2H, 2W), channels_last memory."""
    n, c4, h1, w1 = y.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    pixels = y.permute(0, 2, 3, 1)  # (N, H+1, W+1, 4C)

    def phase(py, px):
        k = 2 * py + px
        return pixels[:, py:py + h, px:px + w, k * c:(k + 1) * c]

    rows = [torch.stack([phase(py, 0), phase(py, 1)], dim=3) for py in (0, 1)]  # (N, H, W, 2, C) each
    return torch.stack(rows, dim=2).reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


def attach(up: nn.Module) -> bool:
    """With ENABLED, give a convertible upsampler its 2x2 convolution, once, as the submodule `subpixel_conv`
    (-> whether it has one). It must exist before the step's convolutions are swapped (input-size recording,
    tuning, the Triton kernel): those walk the model's modules, and then treat it like any other convolution."""
    if ENABLED and can_convert(up) and not hasattr(up, "subpixel_conv"):
        up.subpixel_conv = subpixel_convolution(up.conv)
    return ENABLED and hasattr(up, "subpixel_conv")


def upsample_conv(up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What `parts.UNetDecoder` computes for an Upsample2D: up.conv(F.interpolate(x, 2x, nearest)); as the 2x2
    convolution + depth_to_space when `attach` gave it one."""
    if ENABLED and hasattr(up, "subpixel_conv"):
        return depth_to_space(up.subpixel_conv(x))
    return up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

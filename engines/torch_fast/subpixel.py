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

import weakref

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


# Input maps smaller than this keep interpolate + 3x3. There the convolution streams its weights (few pixels, big
# channels), and the 2x2 form's weights are 16/9 as many bytes: tuned on an H200, 1280 channels at 4x6 took 25.1 us
# as 2x2 against 21.7 as 3x3, while at 8x12 it took 41.4 against 46.1 and 640 channels at 16x24 32.0 against 46.3.
MIN_INPUT_PIXELS = 96


_HELD: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def upsamplers(unet: nn.Module) -> list[nn.Module]:
    """The up path's Upsample2D modules in execution order."""
    return [up for block in unet.up_blocks for up in (block.upsamplers or [])]


def convolutions(unet: nn.Module, latent_size: "tuple[int, int] | None" = None) -> nn.ModuleDict:
    """The 2x2 convolutions of the unet's convertible upsamplers, by position in `upsamplers(unet)` ('0', '1', ...):
    with ENABLED, those whose input map has >= MIN_INPUT_PIXELS (latent_size (h, w) gives the sizes; None: all).

    Made once per (unet, latent_size) and kept beside the unet, not inside it, so the model's modules and state
    dict stay as loaded. Every decoder built for that unet shares them, and the step's convolution swaps
    (input-size recording, tuning, the Triton kernel) take this dict as one more root, like the networks."""
    per_size = _HELD.setdefault(unet, {})
    if latent_size not in per_size:
        held = nn.ModuleDict()
        size = None
        if latent_size is not None:  # the up path starts at the deepest level
            downs = sum(1 for block in unet.down_blocks if block.downsamplers)
            size = (latent_size[0] >> downs, latent_size[1] >> downs)
        for i, up in enumerate(upsamplers(unet)):
            big_enough = size is None or size[0] * size[1] >= MIN_INPUT_PIXELS
            if ENABLED and big_enough and can_convert(up):
                held[str(i)] = subpixel_convolution(up.conv)
            size = None if size is None else (2 * size[0], 2 * size[1])
        per_size[latent_size] = held
    return per_size[latent_size]


def upsample_conv(up: nn.Module, x: torch.Tensor, conv: "nn.Module | None" = None) -> torch.Tensor:
    """What `parts.UNetDecoder` computes for an Upsample2D: up.conv(F.interpolate(x, 2x, nearest)); as
    depth_to_space(conv(x)) when given its 2x2 convolution (from `convolutions`)."""
    if conv is not None:
        return depth_to_space(conv(x))
    return up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

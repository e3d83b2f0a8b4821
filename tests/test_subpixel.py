"""engines/torch_fast/subpixel.py: conv3x3(nearest_2x(x)) as a 2x2 convolution + depth-to-space."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engines.torch_fast import subpixel


@pytest.mark.parametrize("h,w", [(4, 6), (3, 5), (1, 1)])
def test_subpixel_convolution_is_the_upsampled_convolution(h, w):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1).double()
    x = torch.randn(2, 6, h, w, dtype=torch.float64)
    want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = subpixel.depth_to_space(subpixel.subpixel_convolution(conv)(x))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_depth_to_space_places_each_parity_block():
    y = torch.zeros(1, 4, 3, 4)
    for k in range(4):
        y[0, k] = 10 * k + torch.arange(12.0).reshape(3, 4)
    out = subpixel.depth_to_space(y)  # (1, 1, 4, 6)
    assert out.shape == (1, 1, 4, 6)
    # output (2i + py, 2j + px) is block 2py + px at (i + py, j + px)
    assert out[0, 0, 0, 0] == y[0, 0, 0, 0] and out[0, 0, 0, 1] == y[0, 1, 0, 1]
    assert out[0, 0, 3, 5] == y[0, 3, 2, 3] and out[0, 0, 2, 3] == y[0, 1, 1, 2]
    assert out.is_contiguous(memory_format=torch.channels_last)


class _Upsample(nn.Module):  # the attributes of a diffusers Upsample2D that upsample_conv reads
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.use_conv_transpose = False


def test_upsample_conv_with_and_without_its_subpixel_convolution():
    torch.manual_seed(1)
    up = _Upsample(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 5, 7)
    want = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(subpixel.upsample_conv(up, x), want)
    conv = subpixel.subpixel_convolution(up.conv)
    assert conv.kernel_size == (2, 2) and conv.out_channels == 16
    torch.testing.assert_close(subpixel.upsample_conv(up, x, conv), want, rtol=1e-5, atol=1e-5)


def test_subpixel_convolutions_live_beside_the_unet(tiny_bundle):
    """One set per (unet, latent size), made before any step so the convolution swaps can see them; by map size
    when the latent size is known; the unet's own modules and state dict are left as they are."""
    from engines.torch_fast.parts import UNetDecoder

    unet = tiny_bundle.unet
    keys = set(unet.state_dict())
    ups = subpixel.upsamplers(unet)
    downs = sum(1 for block in unet.down_blocks if block.downsamplers)
    assert len(ups) == downs == 3  # SD-shaped: input maps 4x6, 8x12, 16x24 for a 32x48 latent
    decoder = UNetDecoder(unet, latent_size=(32, 48))
    held = subpixel.convolutions(unet, (32, 48))
    assert decoder.subpixel is held and UNetDecoder(unet, latent_size=(32, 48)).subpixel is held
    assert sorted(held.keys()) == (["1", "2"] if subpixel.ENABLED else [])
    assert sorted(subpixel.convolutions(unet).keys()) == (["0", "1", "2"] if subpixel.ENABLED else [])
    assert set(unet.state_dict()) == keys


def test_other_upsamplers_are_left_alone():
    assert not subpixel.can_convert(_Upsample(nn.Conv2d(4, 4, 3, padding=0)))
    assert not subpixel.can_convert(_Upsample(nn.Conv2d(4, 4, 1)))
    up = _Upsample(nn.Conv2d(4, 4, 3, padding=1))
    up.use_conv_transpose = True
    assert not subpixel.can_convert(up)

"""A ResnetBlock2D (or the twin encoder's pair of them) with its adds and shortcut folded into the convolutions.

Why: compiled by Inductor, a ResNet block of the step is about seven kernels: GroupNorm statistics and apply
(x2), the two convolutions, the 1x1 shortcut matmul, and the adds of the time embedding and the residual. At
256x384 each is a few microseconds, so the count is the cost. Here:

    GN1 + SiLU                      Inductor (statistics + apply)
    conv1 + (bias + temb)           one kernel; bias + temb is a row of the time table (see `fold_conv1_bias`)
                                    (or, where the tuner chose a cuDNN graph-API config, that convolution, the
                                    row added by Inductor in the next kernel; likewise conv2 + residual, the
                                    1x1 shortcut then a cuBLAS GEMM accumulating into conv2's output)
    GN2 + SiLU                      Inductor
    conv2 + shortcut + residual     one kernel: the 1x1 shortcut's weights are extra K rows of conv2's GEMM
                                    (`triton_conv`), or the identity residual is added in its epilogue

(A one-kernel Triton GroupNorm was tried and measured slower than Inductor's two kernels: bench/NOTES.md.)

Computes what `parts._resnet` computes (same weights, fp32 accumulation, one rounding per kernel).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch_fast import cudnn_conv, triton_conv
from engines.torch_fast.conv_tuning import ConvShape
from engines.torch_fast.parts import stacked_group_norm
from engines.torch_fast.triton_conv import ConvConfig


def can_fuse(block) -> bool:
    """The ResnetBlock2D layouts FusedResnet computes: SD's plain blocks (3x3 same-size convolutions, default time
    norm, SiLU, no up/down sampling, scale 1, optional 1x1 shortcut)."""
    c1, c2, sc = block.conv1, block.conv2, block.conv_shortcut
    same = all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) and c.groups == 1
               and c.dilation == (1, 1) and c.bias is not None for c in (c1, c2))
    shortcut_ok = sc is None or (sc.kernel_size == (1, 1) and sc.stride == (1, 1) and sc.padding == (0, 0)
                                 and sc.groups == 1)
    return (same and shortcut_ok and block.time_embedding_norm == "default" and not block.up and not block.down
            and block.output_scale_factor == 1.0 and block.time_emb_proj is not None
            and isinstance(block.nonlinearity, nn.SiLU) and block.norm1.affine and block.norm2.affine)


def shortcut_channels(block) -> int:
    """Input channels of the 1x1 shortcut folded into conv2 (0: identity residual)."""
    return 0 if block.conv_shortcut is None else block.conv_shortcut.in_channels


def fused_conv2_shape(block, input_shapes: dict, groups: int = 1) -> ConvShape:
    """The shape a FusedResnet's second convolution is tuned at: conv2 plus the block's 1x1 shortcut, if any
    (input_shapes: recorded input shape per nn.Conv2d; groups: 2 for a twin pair)."""
    return ConvShape.of(block.conv2, input_shapes[block.conv2], groups, shortcut_channels(block))


class FusedResnet(nn.Module):
    """blocks: one ResnetBlock2D, or a (UNet, ControlNet) pair run as groups over the two halves of the batch.

    forward(x, conv1_bias): conv1_bias is conv1.bias + time_emb_proj(silu(emb)), (C,) or (groups, C).
    conv1_config, conv2_config: Triton configs, or names of cuDNN graph-API engine configs (`cudnn_conv`: the
    biases and an identity residual are then added by the next kernel, a 1x1 shortcut by a GEMM into conv2's
    output)."""

    def __init__(self, blocks: tuple, conv1_config: "ConvConfig | str", conv2_config: "ConvConfig | str"):
        super().__init__()
        if not all(can_fuse(b) for b in blocks):
            raise ValueError("FusedResnet needs plain SD ResNet blocks (see can_fuse)")
        self.groups = len(blocks)
        first = blocks[0]
        self.norm_groups = (first.norm1.num_groups, first.norm2.num_groups)
        self.eps = (first.norm1.eps, first.norm2.eps)
        self.conv1_config, self.conv2_config = conv1_config, conv2_config
        self.has_shortcut = first.conv_shortcut is not None

        def stacked(make):
            values = [make(b).detach() for b in blocks]
            return nn.Parameter((values[0] if self.groups == 1 else torch.stack(values)).contiguous(),
                                requires_grad=False)

        def for_cudnn(make, convert):  # as cudnn_conv reads them: convert is krsc_weights or shortcut_matrices
            return nn.Parameter(convert(torch.stack([make(b).detach() for b in blocks])), requires_grad=False)

        self.norm1_weight = stacked(lambda b: b.norm1.weight)
        self.norm1_bias = stacked(lambda b: b.norm1.bias)
        self.norm2_weight = stacked(lambda b: b.norm2.weight)
        self.norm2_bias = stacked(lambda b: b.norm2.bias)
        self.conv1_plan = conv1_config if isinstance(conv1_config, str) else None
        self.conv2_plan = conv2_config if isinstance(conv2_config, str) else None
        if self.conv1_plan is not None:
            self.conv1_weight = for_cudnn(lambda b: b.conv1.weight, cudnn_conv.krsc_weights)
        else:
            self.conv1_weight = stacked(lambda b: triton_conv.weight_matrix(b.conv1.weight))
        sc = (lambda b: b.conv_shortcut.weight) if self.has_shortcut else (lambda b: None)
        self.shortcut_weight = None
        if self.conv2_plan is not None:
            self.conv2_weight = for_cudnn(lambda b: b.conv2.weight, cudnn_conv.krsc_weights)
            if self.has_shortcut:  # (Cs, Cout), or (G, Cs, Cout) for a pair
                self.shortcut_weight = for_cudnn(lambda b: b.conv_shortcut.weight, cudnn_conv.shortcut_matrices)
        else:
            self.conv2_weight = stacked(lambda b: triton_conv.weight_matrix(b.conv2.weight, sc(b)))
        self.conv2_bias = stacked(lambda b: b.conv2.bias + (b.conv_shortcut.bias if self.has_shortcut
                                                            and b.conv_shortcut.bias is not None else 0))

    def forward(self, x: torch.Tensor, conv1_bias: torch.Tensor) -> torch.Tensor:
        h = F.silu(stacked_group_norm(x, self.norm_groups[0], self.eps[0], self.norm1_weight, self.norm1_bias))
        if self.conv1_plan is not None:
            h = cudnn_conv.with_bias(cudnn_conv.conv2d(h, self.conv1_weight, 1, self.conv1_plan), conv1_bias,
                                     self.groups)
        else:
            h = triton_conv.conv2d_nhwc(h, self.conv1_weight, conv1_bias, 3, 1, 1, self.conv1_config, self.groups)
        h = F.silu(stacked_group_norm(h, self.norm_groups[1], self.eps[1], self.norm2_weight, self.norm2_bias))
        if self.conv2_plan is not None:
            y = cudnn_conv.conv2d(h, self.conv2_weight, 1, self.conv2_plan,
                                  shortcut=x if self.has_shortcut else None, shortcut_weight=self.shortcut_weight)
            return cudnn_conv.with_bias(y, self.conv2_bias, self.groups, residual=None if self.has_shortcut else x)
        return triton_conv.conv2d_nhwc(h, self.conv2_weight, self.conv2_bias, 3, 1, 1, self.conv2_config,
                                       self.groups, shortcut=x if self.has_shortcut else None,
                                       residual=None if self.has_shortcut else x)


def fused_if_tuned(blocks: tuple, input_shapes: dict,
                   conv_config: Callable[[ConvShape], "ConvConfig | None"],
                   graph_plan: Callable[[ConvShape], "str | None"] = lambda shape: None) -> "FusedResnet | None":
    """A FusedResnet for one block (or a twin pair, run as len(blocks) groups) when the blocks can be fused and the
    tuning table put each of its convolutions on Triton (conv_config gives None otherwise) or on a cuDNN graph-API
    config (graph_plan gives its name); else None."""
    if not all(can_fuse(b) for b in blocks):
        return None
    first, groups = blocks[0], len(blocks)
    shape1 = ConvShape.of(first.conv1, input_shapes[first.conv1], groups)
    conv1 = conv_config(shape1) or graph_plan(shape1)
    shape2 = fused_conv2_shape(first, input_shapes, groups)
    conv2 = conv_config(shape2) or graph_plan(shape2)
    return None if conv1 is None or conv2 is None else FusedResnet(blocks, conv1, conv2)


def fold_conv1_bias(table: torch.Tensor, slices: list[tuple[int, int]], resnets: list, fused: set) -> torch.Tensor:
    """Time table (S, sum C) with conv1.bias added to the columns of every resnet in `fused`: their conv1 adds
    the row as its bias, so bias + time embedding cost no kernel of their own."""
    table = table.clone()
    for (start, end), block in zip(slices, resnets):
        if block in fused:
            table[:, start:end] += block.conv1.bias.detach().to(table.dtype)
    return table

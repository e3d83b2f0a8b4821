"""The UNet encoder and the ControlNet as ONE batched network: every layer runs both in one kernel.

Why: the ControlNet's down path and mid block have exactly the UNet encoder's structure, and within a step the two
do not depend on each other. Run as two networks on two CUDA streams (parts.py), their ~500 small kernels per step
overlap only partly: on an H200 the pair took 2.07 ms of a 4.2 ms step, against 1.45 ms for the ControlNet alone
(bench/NOTES.md). Here the activations of both are stacked along the batch, [UNet cond, UNet uncond, ControlNet
cond, ControlNet uncond], and each layer's two weight sets are stacked too, so every layer is one launch over twice
the rows: batched matmuls (cuBLAS strided-batched GEMM) for linears and 1x1 convolutions, the grouped Triton
implicit-GEMM kernel for 3x3 convolutions, and plain norms followed by per-group affine transforms.

`TwinEncoder` computes exactly what `UNetEncoder` + `ControlBranch` compute (the parity tests hold it to that).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch_fast import (cudnn_conv, doubling, folded_cross, linear_norm, norm_matmul, parts, residual_gemm,
                                triton_conv, zero_convs)
from engines.torch_fast.conv_tuning import ConvShape
from engines.torch_fast.fused_resnet import fused_if_tuned
from engines.torch_fast.parts import (_heads, _kv_counts, _merge_heads, _resnets_of, _split, _transformers_of,
                                      _transformers_of_up, feed_forward_out_weight, fused_qkv_weight, group_norm_rows,
                                      in_out_matrix, prenorm_form, residual_and_norm, stacked_group_norm)
from engines.torch_fast.triton_attention import sdpa
from engines.torch_fast.triton_geglu import geglu
from engines.torch_fast.triton_conv import ConvConfig
from engines.torch_fast.zero_convs import ZeroConvs
from profiles.config import env_flag

GROUPS = 2  # 0: UNet encoder, 1: ControlNet
# The first transformer pair runs on one copy of the CFG batch until its cross-attention (A/B measurements; 0: the
# batch is doubled before it).
SHARE_SELF_ATTENTION = env_flag("CNRT_TWIN_SHARED_SELF_ATTENTION", True)
# The transformers' input norm computed as `parts.group_norm_rows` (A/B measurements; 0: the group norm as a map,
# then a reshape into rows).
TRANSFORMER_NORM_ROWS = env_flag("CNRT_TRANSFORMER_NORM_ROWS", True)


def can_pair(unet, controlnet) -> bool:
    """True when the ControlNet's down path + mid block have the UNet encoder's parameters, name for name."""
    def layout(net):
        return [(n, tuple(p.shape)) for block in list(net.down_blocks) + [net.mid_block]
                for n, p in block.named_parameters()]

    return layout(unet) == layout(controlnet)


class _Stack:
    """Builds stacked (GROUPS, ...) buffers from pairs of layers and registers them on the owning module."""

    def __init__(self, owner: nn.Module):
        self.owner = owner
        self.count = 0

    def __call__(self, pair: tuple, make: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        value = torch.stack([make(m).detach() for m in pair]).contiguous()
        name = f"w{self.count}"
        self.count += 1
        self.owner.register_buffer(name, value, persistent=False)
        return getattr(self.owner, name)


class _TwinNorm(nn.Module):
    def __init__(self, pair, stack: _Stack, kind: str):
        super().__init__()
        self.kind = kind  # "group" or "layer"
        self.groups = getattr(pair[0], "num_groups", None)
        self.eps = pair[0].eps
        self.weight = stack(pair, lambda m: m.weight)
        self.bias = stack(pair, lambda m: m.bias)

    def rows(self, x: torch.Tensor, residual_bias: "torch.Tensor | None" = None):
        """A group norm of x (G*B, C, H, W) as (G, B*H*W, C) rows, with x + residual_bias (G, C) alongside
        (`parts.group_norm_rows`)."""
        return group_norm_rows(x, self.groups, self.eps, self.weight, self.bias, residual_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """group: x (G*B, C, H, W); layer: x (G, rows, C)."""
        if self.kind == "group":
            return stacked_group_norm(x, self.groups, self.eps, self.weight, self.bias)
        y = F.layer_norm(x, (x.shape[-1],), eps=self.eps)
        return y * self.weight[:, None, :] + self.bias[:, None, :]


class _TwinLinear(nn.Module):
    """A pair of Linear layers (or 1x1 convolutions) applied to (G, rows, in) as one batched matmul."""

    def __init__(self, pair, stack: _Stack):
        super().__init__()
        self.weight = stack(pair, lambda m: in_out_matrix(m)[0])  # (in, out)
        self.bias = None if pair[0].bias is None else stack(pair, lambda m: m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not baddbmm: it first copies the broadcast bias into the whole output (an ATen copy per call, 5 ms per
        # loop on an H200); a plain add fuses into the consumer's kernel.
        out = torch.bmm(x, self.weight)
        return out if self.bias is None else out + self.bias[:, None, :]


class _TwinConv(nn.Module):
    """A pair of 3x3 (kxk) convolutions over the two halves of the batch: the grouped Triton kernel with a tuned
    config, or a cuDNN graph-API engine config by name (`cudnn_conv.run_groups`, the biases added by the next
    kernel), or (neither: CPU, or cuDNN's own call measured faster) one conv2d per half and a concatenation."""

    def __init__(self, pair, stack: _Stack, config: "ConvConfig | str | None"):
        super().__init__()
        conv = pair[0]
        self.kernel, self.stride, self.padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        self.config = config if not isinstance(config, str) else None
        self.plan = config if isinstance(config, str) else None
        if self.config is not None:
            self.weight = stack(pair, lambda m: triton_conv.weight_matrix(m.weight))
        elif self.plan is not None:
            self.weight = stack(pair, lambda m: m.weight.permute(0, 2, 3, 1))  # (G, Cout, k, k, Cin): KRSC
        else:
            self.weight = stack(pair, lambda m: m.weight)
        self.bias = stack(pair, lambda m: m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config is not None:
            return triton_conv.conv2d_nhwc(x, self.weight, self.bias, self.kernel, self.stride, self.padding,
                                           self.config, groups=GROUPS)
        if self.plan is not None:
            y = cudnn_conv.conv2d(x, self.weight.permute(0, 1, 4, 2, 3), self.padding, self.plan, self.stride)
            return cudnn_conv.with_bias(y, self.bias, GROUPS)
        return torch.cat([F.conv2d(h, w, b, self.stride, self.padding)
                          for h, w, b in zip(x.chunk(GROUPS), self.weight, self.bias)])


def _double_images(t: torch.Tensor) -> torch.Tensor:
    """(G*B, ...) -> (G*2B, ...): each network's images twice, [copy, copy]: the CFG batch from one copy.

    A channels_last map is doubled as (G, B, H, W, C) rows, so that the compiled buffer is channels_last too: as a
    (G, B, C, H, W) concatenation Inductor stored the first state channel-major, and the zero convolutions' input
    kernels transposed it back twice (`parts.cat_channels` has the measurement)."""
    if t.dim() == 4 and parts.CAT_CHANNELS_LAST and t.is_contiguous(memory_format=torch.channels_last):
        return _repeat_per_group(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return _repeat_per_group(t)


def _repeat_per_group(t: torch.Tensor) -> torch.Tensor:
    """(G*B, ...) -> (G*2B, ...), [copy, copy] per network, in t's own dimension order."""
    per_group = t.reshape(GROUPS, -1, *t.shape[1:])
    return doubling.twice_along_1(per_group).reshape(-1, *t.shape[1:])


def _double_rows(t: torch.Tensor) -> torch.Tensor:
    """(G, B*T, X) -> (G, 2*B*T, X), the rows of `_double_images`."""
    return doubling.twice_along_1(t)


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """(G*B, C, H, W) channels_last -> (G, B*H*W, C)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(GROUPS, n // GROUPS * h * w, c)


def _from_rows(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(G, B*H*W, C) -> (G*B, C, H, W) channels_last (n = G*B)."""
    return rows.reshape(n, h, w, rows.shape[-1]).permute(0, 3, 1, 2)


class _TwinResnet(nn.Module):
    def __init__(self, pair, stack: _Stack, conv_config: Callable):
        super().__init__()
        u = pair[0]
        self.norm1 = _TwinNorm((pair[0].norm1, pair[1].norm1), stack, "group")
        self.conv1 = _TwinConv((pair[0].conv1, pair[1].conv1), stack, conv_config(pair[0].conv1))
        self.norm2 = _TwinNorm((pair[0].norm2, pair[1].norm2), stack, "group")
        self.conv2 = _TwinConv((pair[0].conv2, pair[1].conv2), stack, conv_config(pair[0].conv2))
        self.shortcut = None if u.conv_shortcut is None else \
            _TwinLinear((pair[0].conv_shortcut, pair[1].conv_shortcut), stack)
        self.scale = u.output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """temb: (G, C) rows of time_emb_proj(silu(emb)) of the two networks."""
        h = self.conv1(F.silu(self.norm1(x)))
        c = h.shape[1]
        h = (h.reshape(GROUPS, -1, *h.shape[1:]) + temb.reshape(GROUPS, 1, c, 1, 1)).reshape(h.shape)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.shortcut is not None:
            x = _from_rows(self.shortcut(_to_rows(x)), x.shape[0], x.shape[2], x.shape[3])
        return (x + h) / self.scale


class _TwinTransformer(nn.Module):
    def __init__(self, pair, stack: _Stack):
        super().__init__()
        u, c = pair
        self.norm = _TwinNorm((u.norm, c.norm), stack, "group")
        self.proj_in = _TwinLinear((u.proj_in, c.proj_in), stack)
        self.proj_out = _TwinLinear((u.proj_out, c.proj_out), stack)
        self.blocks = nn.ModuleList()
        for bu, bc in zip(u.transformer_blocks, c.transformer_blocks):
            block = nn.Module()
            block.heads = bu.attn1.heads
            block.norm1 = _TwinNorm((bu.norm1, bc.norm1), stack, "layer")
            block.norm2 = _TwinNorm((bu.norm2, bc.norm2), stack, "layer")
            block.norm3 = _TwinNorm((bu.norm3, bc.norm3), stack, "layer")
            block.qkv = stack((bu.attn1, bc.attn1), lambda a: fused_qkv_weight(a).t())
            block.out1 = _TwinLinear((bu.attn1.to_out[0], bc.attn1.to_out[0]), stack)
            block.q2 = _TwinLinear((bu.attn2.to_q, bc.attn2.to_q), stack)
            block.out2 = _TwinLinear((bu.attn2.to_out[0], bc.attn2.to_out[0]), stack)
            block.ff1 = _TwinLinear((bu.ff.net[0].proj, bc.ff.net[0].proj), stack)
            block.ff2 = _TwinLinear((bu.ff.net[2], bc.ff.net[2]), stack)
            self.blocks.append(block)
        # Either the pre-norm form (see `_prenorm_forward`: the stream starts without proj_in's bias), or the last
        # ff2 inside proj_out (`residual_gemm.folds_feed_forward`: [Wp; W2 Wp] per network)
        self.prenorm = self.ff_out = None
        if prenorm_form():
            self.prenorm = norm_matmul.PrenormTransformer(
                self.proj_in.bias,
                [([(n.weight, n.bias, n.eps) for n in (blk.norm1, blk.norm2, blk.norm3)], blk.qkv, blk.q2.weight,
                  (blk.ff1.weight, blk.ff1.bias), (blk.out1.bias, blk.out2.bias, blk.ff2.bias))
                 for blk in self.blocks],
                self.proj_out.weight, self.proj_out.bias)
        elif residual_gemm.folds_feed_forward(len(u.transformer_blocks)):
            self.ff_out = stack(((u.transformer_blocks[-1].ff.net[2], u.proj_out),
                                 (c.transformer_blocks[-1].ff.net[2], c.proj_out)),
                                lambda pair: feed_forward_out_weight(*pair))

    def forward(self, x: torch.Tensor, kv: list[torch.Tensor], double_at_cross: bool = False) -> torch.Tensor:
        """x (G*B, C, H, W); kv: [K, V] per block, (G*B, heads, 77, d) with the UNet's first, or the folded
        [A, B] per block (`folded_cross.active()`).

        double_at_cross: x holds one copy of the CFG batch (G*B/2 images, cond = uncond), as the shared first
        ResNet pair leaves it; everything before the first cross-attention runs on that copy, and the rows are
        doubled ([copy, copy] per network, `_double_images`) where the prompts first differ."""
        if self.prenorm is not None:
            return self._prenorm_forward(x, kv, double_at_cross)
        n, _, height, width = x.shape
        tokens = height * width
        residual = None  # x + proj_out's bias, as rows (when the norm's kernel makes it)
        if TRANSFORMER_NORM_ROWS:
            normed, residual = self.norm.rows(x, self.proj_out.bias if residual_gemm.PROJ_OUT else None)
        else:
            normed = _to_rows(self.norm(x))
        # proj_in and both attention outputs with the norm after each: `residual_and_norm` (one kernel where
        # linear_norm holds the width; opt-in).
        fused = all(linear_norm.holds(layer.weight, layer.bias) for layer in
                    [self.proj_in] + [blk.out1 for blk in self.blocks] + [blk.out2 for blk in self.blocks])
        if fused:
            h, normed = residual_and_norm(True, self.proj_in.weight, self.proj_in.bias, normed, None,
                                          self.blocks[0].norm1)
        else:
            h = self.proj_in(normed)  # (G, B*T, inner)

        def per_image(t):  # (G, B*T, X) -> (G*B, T, X)
            return t.reshape(-1, tokens, t.shape[-1])

        def per_group(t):
            return t.reshape(GROUPS, -1, t.shape[-1])

        folded = folded_cross.active()  # what `cross_attention_kv` asked too: kv holds (A, B)
        for i, block in enumerate(self.blocks):
            if not fused or i > 0:
                normed = block.norm1(h)
            q, k, v = per_image(torch.bmm(normed, block.qkv)).chunk(3, dim=-1)
            a = sdpa(_heads(q, block.heads), _heads(k, block.heads), _heads(v, block.heads))
            h, normed = residual_and_norm(fused, block.out1.weight, block.out1.bias, per_group(_merge_heads(a)), h,
                                          block.norm2)
            doubling = double_at_cross and i == 0
            if doubling:
                h, x = _double_rows(h), _double_images(x)
                residual = None if residual is None else _double_rows(residual)
                n = 2 * n
            if folded:  # per image (`folded_cross`); the copy's rows serve both CFG images where doubling
                weight, a = None, folded_cross.attend(per_image(normed), kv[2 * i], kv[2 * i + 1])
            else:  # the query projected on the copy, then doubled
                q = _heads(per_image(block.q2(normed)), block.heads)
                weight, a = block.out2.weight, _merge_heads(sdpa(_double_images(q) if doubling else q,
                                                                 kv[2 * i], kv[2 * i + 1]))
            # With FEED_FORWARD, h comes back as h + ff2's bias: where ff2 accumulates its product
            accumulate = residual_gemm.FEED_FORWARD
            h, normed = residual_and_norm(fused, weight, block.out2.bias, per_group(a), h,
                                          block.norm3, block.ff2.bias if accumulate else None)
            if self.ff_out is not None and i == len(self.blocks) - 1:
                h = geglu(normed, block.ff1.weight, block.ff1.bias, prefix=h)  # [h, g] rows for self.ff_out
            else:
                g = geglu(normed, block.ff1.weight, block.ff1.bias)
                h = residual_gemm.accumulate_mm(h, g, block.ff2.weight) if accumulate else block.ff2(g) + h
        if residual_gemm.PROJ_OUT:
            weight = self.proj_out.weight if self.ff_out is None else self.ff_out
            if residual is None:
                out = residual_gemm.linear_plus_residual(h, weight, self.proj_out.bias, _to_rows(x))
            else:
                out = residual_gemm.accumulate_mm(residual, h, weight)
            return _from_rows(out, n, height, width)
        return _from_rows(self.proj_out(h), n, height, width) + x

    def _prenorm_forward(self, x: torch.Tensor, kv: list[torch.Tensor], double_at_cross: bool) -> torch.Tensor:
        """`forward` with every LayerNorm inside the GEMM that reads it (`norm_matmul`, as
        `parts._prenorm_transformer`): the stream h is kept without the biases of proj_in and of the projections
        that write it, which accumulate into h in cuBLAS; `self.prenorm`'s folded layers add the pending biases
        back, and its proj_out bias carries the rest."""
        n, _, height, width = x.shape
        tokens = height * width
        if TRANSFORMER_NORM_ROWS:
            normed, residual = self.norm.rows(x, self.prenorm.proj_out_bias)
        else:
            normed, residual = _to_rows(self.norm(x)), None
        h = torch.bmm(normed, self.proj_in.weight)  # (G, B*T, inner); proj_in's bias is pending

        def per_image(t):  # (G, B*T, X) -> (G*B, T, X)
            return t.reshape(-1, tokens, t.shape[-1])

        def per_group(t):
            return t.reshape(GROUPS, -1, t.shape[-1])

        for i, (block, (qkv, to_q, norm_geglu)) in enumerate(zip(self.blocks, self.prenorm.layers)):
            q, k, v = per_image(qkv(h)).chunk(3, dim=-1)
            a = sdpa(_heads(q, block.heads), _heads(k, block.heads), _heads(v, block.heads))
            h = residual_gemm.accumulate_mm(h, per_group(_merge_heads(a)), block.out1.weight)
            q = _heads(per_image(to_q(h)), block.heads)
            if double_at_cross and i == 0:
                q, h, x = _double_images(q), _double_rows(h), _double_images(x)
                residual = None if residual is None else _double_rows(residual)
                n = 2 * n
            a = sdpa(q, kv[2 * i], kv[2 * i + 1])
            h = residual_gemm.accumulate_mm(h, per_group(_merge_heads(a)), block.out2.weight)
            h = residual_gemm.accumulate_mm(h, norm_geglu(h), block.ff2.weight)
        if residual is None:
            out = residual_gemm.linear_plus_residual(h, self.proj_out.weight, self.prenorm.proj_out_bias,
                                                     _to_rows(x))
        else:
            out = residual_gemm.accumulate_mm(residual, h, self.proj_out.weight)
        return _from_rows(out, n, height, width)


class TwinEncoder(nn.Module):
    """x (B,4,h,w) fp32, hint_features (B,C0,h,w), temb rows (G, sum C), K/V list (G*2B, ...) ->
    (UNet mid-block output, the UNet's 12 skip tensors, the ControlNet's 13 unscaled residuals), all batch 2B.
    The first ResNet pair runs at batch B per network (see `shared_first_pair`): `input_shapes` must say so
    (`first_pair_input_sizes`).

    conv_config(shape) gives the Triton config for a pair of convolutions (None: conv2d per half).
    fuse_resnets: ResNet pairs whose convolutions both have configs run as `FusedResnet`. `fused_blocks` then
    lists the diffusers blocks whose conv1.bias the time table must carry (fused_resnet.fold_conv1_bias).
    graph_plan(shape): the cuDNN graph-API engine config the tuner chose for a pair (None: none), which a
    FusedResnet (`fused_if_tuned`) or a downsampler pair runs instead.
    """

    def __init__(self, unet, controlnet, input_shapes: dict,
                 conv_config: Callable[[ConvShape], "ConvConfig | None"] = lambda shape: None,
                 fuse_resnets: bool = False,
                 graph_plan: Callable[[ConvShape], "str | None"] = lambda shape: None):
        super().__init__()
        if not can_pair(unet, controlnet):
            raise ValueError("the ControlNet's encoder does not have the UNet encoder's layout: cannot pair them")
        self.unet, self.controlnet = unet, controlnet
        stack = _Stack(self)

        def config_of(conv):
            return conv_config(ConvShape.of(conv, input_shapes[conv], GROUPS))

        self.fused_blocks: set = set()

        def resnet(pair):
            fused = fused_if_tuned(pair, input_shapes, conv_config, graph_plan) if fuse_resnets else None
            if fused is not None:
                self.fused_blocks.update(pair)
                return fused
            return _TwinResnet(pair, stack, config_of)

        self.layers = nn.ModuleList()  # in execution order, with a tag saying what each one is
        self.plan: list[str] = []
        u_transformers = [t for t in _transformers_of(unet) if t not in _transformers_of_up(unet)]
        c_transformers = _transformers_of(controlnet)
        pairs_t = dict(zip(map(id, u_transformers), c_transformers))
        for bu, bc in zip(unet.down_blocks, controlnet.down_blocks):
            attns_u = getattr(bu, "attentions", None) or [None] * len(bu.resnets)
            for ru, rc, au in zip(bu.resnets, bc.resnets, attns_u):
                self._add("resnet", resnet((ru, rc)))
                if au is not None:
                    self._add("transformer", _TwinTransformer((au, pairs_t[id(au)]), stack))
                self.plan.append("state")
            for du, dc in zip(bu.downsamplers or [], bc.downsamplers or []):
                shape = ConvShape.of(du.conv, input_shapes[du.conv], GROUPS)
                self._add("down", _TwinConv((du.conv, dc.conv), stack, conv_config(shape) or graph_plan(shape)))
                self.plan.append("state")
        mu, mc = unet.mid_block, controlnet.mid_block
        self._add("resnet", resnet((mu.resnets[0], mc.resnets[0])))
        for au, ru, rc in zip(mu.attentions, mu.resnets[1:], mc.resnets[1:]):
            self._add("transformer", _TwinTransformer((au, pairs_t[id(au)]), stack))
            self._add("resnet", resnet((ru, rc)))
        assert self.plan[0] == "resnet"  # the shared first pair: forward runs it before making the CFG batch
        self.kv_counts = _kv_counts(u_transformers)
        self.slices: list[tuple[int, int]] = []
        # Both conv_in read the same latent: one convolution with the two weight sets as output channels.
        cu, cc = unet.conv_in, controlnet.conv_in
        self.conv_in_args = None
        if (cu.kernel_size, cu.stride, cu.padding) == (cc.kernel_size, cc.stride, cc.padding) and \
                cu.bias is not None and cc.bias is not None:
            self.conv_in_args = (cu.stride, cu.padding)
            self.register_buffer("conv_in_weight", torch.cat([cu.weight, cc.weight]).detach()
                                 .contiguous(memory_format=torch.channels_last), persistent=False)
            self.register_buffer("conv_in_bias", torch.cat([cu.bias, cc.bias]).detach(), persistent=False)
        self.resnets = _resnets_of(list(unet.down_blocks) + [unet.mid_block])  # for the time tables
        zero = list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]
        self.zero_convs = ZeroConvs(zero) if zero_convs.ENABLED and zero_convs.can_group(zero) else None

    def _add(self, tag: str, layer: nn.Module) -> None:
        self.layers.append(layer)
        self.plan.append(tag)

    def forward(self, x, hint_features, temb, kv: list[torch.Tensor]):
        dtype = self.unet.conv_in.weight.dtype
        x16 = x.to(dtype)
        b = x.shape[0]
        if self.conv_in_args is not None:
            both = F.conv2d(x16, self.conv_in_weight, self.conv_in_bias, *self.conv_in_args)
            hu, hc = both.split([self.unet.conv_in.out_channels, self.controlnet.conv_in.out_channels], dim=1)
        else:
            hu, hc = self.unet.conv_in(x16), self.controlnet.conv_in(x16)
        hc = hc + hint_features
        # Until the first cross-attention the cond and uncond rows are equal (same latent, same hint): conv_in and
        # the first ResNet pair (plan[0]) run on one copy, [UNet, ControlNet]; `_double_images` makes the CFG batch.
        h = torch.cat([hu, hc])
        states = [_double_images(h)]
        layers = iter(self.layers)
        ts = iter(self.slices)
        per_block = iter(_split(kv, self.kv_counts))
        # With SHARE_SELF_ATTENTION and a transformer next, that transformer doubles the batch itself, at its
        # cross-attention: its norm, proj_in and self-attention run on one copy too.
        shared_transformer = SHARE_SELF_ATTENTION and self.plan[1] == "transformer"
        for i, tag in enumerate(self.plan):
            if i == 1 and not shared_transformer:
                h = _double_images(h)
            if tag == "state":
                states.append(h)
            elif tag == "resnet":
                s = next(ts)
                h = next(layers)(h, temb[:, s[0]:s[1]])
            elif tag == "transformer":
                h = next(layers)(h, next(per_block), double_at_cross=i == 1 and shared_transformer)
            else:
                h = next(layers)(h)
        b2 = 2 * b
        skips = [s[:b2] for s in states]
        cn_states = [s[b2:] for s in states]
        if self.zero_convs is not None:  # one grouped GEMM launch
            return h[:b2], skips, self.zero_convs(cn_states + [h[b2:]])
        net = self.controlnet
        outs = [zc(r) for r, zc in zip(cn_states, net.controlnet_down_blocks)] + [net.controlnet_mid_block(h[b2:])]
        return h[:b2], skips, outs


def shared_first_pair(unet, controlnet) -> tuple:
    """The first ResNet block of each network. Its input, conv_in of the latent (+ the hint features), is the same
    for the cond and the uncond row, so the twin runs it once per network instead of once per CFG row."""
    return unet.down_blocks[0].resnets[0], controlnet.down_blocks[0].resnets[0]


def first_pair_input_sizes(sizes: dict, unet, controlnet) -> dict:
    """Recorded conv input sizes (CFG batch 2B), with the shared first pair's convolutions at batch B."""
    sizes = dict(sizes)
    for block in shared_first_pair(unet, controlnet):
        for conv in (block.conv1, block.conv2, block.conv_shortcut):
            if conv in sizes:
                n, *rest = sizes[conv]
                sizes[conv] = (n // 2, *rest)
    return sizes


def twin_convolutions(net) -> list[nn.Conv2d]:
    """Every convolution of a network's down path and mid block: the twin runs all of them from its own stacked
    weights (the zero convolutions and the hint block lie outside and stay the network's)."""
    return [m for block in list(net.down_blocks) + [net.mid_block] for m in block.modules()
            if isinstance(m, nn.Conv2d)]


def encoder_convolutions(unet) -> list[nn.Conv2d]:
    """The kxk convolutions the twin runs in pairs (resnets' conv1/conv2 and downsamplers of the UNet encoder)."""
    return [m for m in twin_convolutions(unet) if m.kernel_size != (1, 1)]


def twin_kv(unet_kv: list[torch.Tensor], controlnet_kv: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-prompt cross-attention K/V of the two networks, stacked along the batch (UNet first)."""
    return [torch.cat([u, c]).contiguous() for u, c in zip(unet_kv, controlnet_kv)]

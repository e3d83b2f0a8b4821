"""The fused step, re-expressed for speed, in three parts that can run concurrently.

Same function as `models.step.FusedDenoiseStep` (the parity tests hold it to that), computed differently:
- Everything that depends only on the timestep is precomputed for all steps once: the time embedding and every
  ResNet block's `time_emb_proj(silu(emb))` become rows of one table per network (`TimeTables`), so a step does
  a table lookup instead of ~35 tiny Linear kernels.
- Everything that depends only on the prompt is precomputed once per prompt pair: the K and V projections of every
  cross-attention (`CrossAttentionKV`).
- Self-attention Q/K/V are one fused matmul. Attention goes through `triton_attention.sdpa` (a one-launch Triton
  kernel for the small calls, a Gluon kernel for the 32x48 self-attentions) and the feed-forward's GEGLU through
  `triton_geglu.geglu` (one GEMM writing hidden * gelu(gate)); group norms read channels_last maps in memory
  order. The feed-forward's second linear and proj_out add their residual inside the GEMM (`residual_gemm`), and
  the decoder's upsamplers run as 2x2 convolutions with four output phases (`subpixel`).
- The ControlNet (`ControlBranch`) and the UNet encoder + mid block (`UNetEncoder`) do not depend on each other, so
  the runner puts them on two CUDA streams; `UNetDecoder` joins them and ends with the CFG mix and the DDIM update.
The parts walk diffusers' modules (their weights, their configs), so any SD1.5-shaped model (tiny ones included) works.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch_fast import folded_cross, linear_norm, norm_matmul, residual_gemm, subpixel
from engines.torch_fast.triton_attention import sdpa
from engines.torch_fast.triton_geglu import geglu
from profiles.config import env_flag
from scheduler.ddim import cfg_mix, ddim_update


# ---- functional forwards of diffusers blocks, with precomputed time / text projections ----------------------------

def _resnet(block, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """ResnetBlock2D ("default" time norm, no up/down); temb = time_emb_proj(silu(emb)) already, shape (C,)."""
    h = block.conv1(F.silu(group_norm(x, block.norm1)))
    h = h + temb.reshape(1, -1, 1, 1)
    h = block.conv2(F.silu(group_norm(h, block.norm2)))
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x)
    return (x + h) / block.output_scale_factor


# How a channels_last group norm is computed (A/B measurements): "rows" (default) or "native" (F.group_norm).
GROUP_NORM_MODE = os.environ.get("CNRT_GROUP_NORM", "rows")


def stacked_group_norm(x: torch.Tensor, num_groups: int, eps: float, weight: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """group_norm(x) with affine parameters (C,) or stacked (A, C): the batch splits into A equal runs of images,
    run a using weight[a] / bias[a] (the twin encoder's two networks).

    A channels_last x is normalised as (B, H*W, groups, C/groups) rows, the order it lies in memory. F.group_norm
    views it as (B, groups, C/groups*H*W) instead, and Inductor then reads each group's channels strided by C
    (a 30-channel group of a 960-channel map: 60 bytes every 1920); at 32x48 such a statistics kernel took up to
    19.5 us and an apply 15.5 us a call (bench/NOTES.md, session 5)."""
    b, c, height, width = x.shape
    stacks = weight.numel() // c
    if GROUP_NORM_MODE == "native" or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        y = F.group_norm(x, num_groups, eps=eps)
        shape = (stacks, -1, c, 1, 1)
        return (y.reshape(stacks, -1, *x.shape[1:]) * weight.reshape(shape) + bias.reshape(shape)).reshape(x.shape)
    rows = x.permute(0, 2, 3, 1).reshape(b, height * width, num_groups, c // num_groups).float()
    var, mean = torch.var_mean(rows, dim=(1, 3), correction=0, keepdim=True)
    y = ((rows - mean) * torch.rsqrt(var + eps)).reshape(stacks, b // stacks, height * width, c)
    y = y * weight.reshape(stacks, 1, 1, c).float() + bias.reshape(stacks, 1, 1, c).float()
    return y.to(x.dtype).reshape(b, height, width, c).permute(0, 3, 1, 2)


def group_norm_rows(x: torch.Tensor, num_groups: int, eps: float, weight: torch.Tensor, bias: torch.Tensor,
                    residual_bias: "torch.Tensor | None" = None) -> "tuple[torch.Tensor, torch.Tensor | None]":
    """stacked_group_norm(x) (weight, bias: (C,) or stacked (A, C)) returned as the rows a matmul takes,
    (A, B/A*H*W, C), plus, with residual_bias ((C,) or (A, C)), x + residual_bias in the same rows.

    Why: a transformer's norm feeds proj_in, a matmul over rows. In the twin encoder, normalised as a (G*B, C, H, W)
    map and then viewed as (G, B*H*W, C) rows for the batched matmul, the compiled step ran the norm's apply as two
    or three kernels on the GPU: an fp32 normalise, the stacked affine, and a copy Inductor could not prove was a
    view (bench/NOTES.md, session 9). Here the chain is pointwise over one (A, B/A, H*W, groups, C/groups) view of
    x, and x + residual_bias (the start of proj_out's accumulating GEMM, `residual_gemm`) is computed over the
    same view: twin encoder 1.640 -> 1.596 ms a step on an H200. (The decoder's `_transformer` keeps
    `group_norm` + proj_in: there Inductor already fused the apply and x + bias into one kernel, and this form
    split them in two.) Same arithmetic as stacked_group_norm: (x - mean) * rstd * weight + bias in fp32,
    rounded once."""
    b, c, height, width = x.shape
    stacks = weight.numel() // c
    shape = (stacks, b // stacks, height * width, num_groups, c // num_groups)
    per_channel = (stacks, 1, 1, num_groups, c // num_groups)
    view = x.permute(0, 2, 3, 1).reshape(shape)
    rows = view.float()
    var, mean = torch.var_mean(rows, dim=(2, 4), correction=0, keepdim=True)
    y = (rows - mean) * torch.rsqrt(var + eps)
    y = y * weight.reshape(per_channel).float() + bias.reshape(per_channel).float()
    y = y.to(x.dtype).reshape(stacks, -1, c)
    if residual_bias is None:
        return y, None
    return y, (view + residual_bias.reshape(per_channel)).reshape(stacks, -1, c)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """norm(x) for an affine nn.GroupNorm, laid out for x's memory format (see stacked_group_norm)."""
    return stacked_group_norm(x, norm.num_groups, norm.eps, norm.weight, norm.bias)


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed by `group_norm` for 4-D inputs: what diffusers' own blocks (the VAE decoder's) call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not self.affine:
            return super().forward(x)
        return group_norm(x, self)


def use_channels_last_group_norm(module: nn.Module) -> int:
    """Replaces every nn.GroupNorm inside module by a ChannelsLastGroupNorm with the same parameters; -> count."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                new = ChannelsLastGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine,
                                            device=child.weight.device if child.affine else None,
                                            dtype=child.weight.dtype if child.affine else None)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
                count += 1
    return count


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def residual_and_norm(fused: bool, weight: torch.Tensor, bias: torch.Tensor, a: torch.Tensor,
                      residual: "torch.Tensor | None", norm: nn.Module,
                      next_bias: "torch.Tensor | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + next_bias, norm(h)) for h = residual + a @ weight + bias: a projection that writes the residual stream
    and the norm after it. weight is (in, out), or the twin's stacked (G, in, out) with (G, out) biases and a
    stacked norm; next_bias (the next accumulating GEMM's, `residual_gemm`) may be None.

    fused: one `linear_norm` kernel. Else a GEMM (+ bias), the add, and the norm's own kernel, as before it.
    weight None: a is the product already (the folded cross-attention's, `folded_cross.attend`); bias is (G, out)
    for the twin's stacked layers."""
    if fused:
        return linear_norm.linear_norm(a, weight, bias, norm.weight, norm.bias, norm.eps, residual=residual,
                                       extra_bias=next_bias)
    stacked = weight.dim() == 3 if weight is not None else bias is not None and bias.dim() == 2
    if weight is None:
        h = a if bias is None else a + (bias[:, None, :] if stacked else bias)
    elif stacked:  # not baddbmm: see twin._TwinLinear
        h = torch.bmm(a, weight) if bias is None else torch.bmm(a, weight) + bias[:, None, :]
    else:
        h = F.linear(a, weight.t(), bias)
    if residual is not None:
        h = h + residual
    normed = norm(h)
    if next_bias is not None:
        h = h + (next_bias[:, None, :] if stacked else next_bias)
    return h, normed


def prenorm_form() -> bool:
    """Whether the transformers run in the pre-norm form (`norm_matmul.ENABLED`), which the opt-in `linear_norm`
    form excludes. The decoder (`prenorm_transformers`) and the twin encoder ask the same question here."""
    return norm_matmul.ENABLED and not linear_norm.ENABLED


def fused_qkv_weight(attn) -> torch.Tensor:
    """A self-attention's to_q, to_k and to_v weights as one (3 * inner, C) nn.Linear-layout matrix."""
    return torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()


def prenorm_transformers(transformers) -> "nn.ModuleList | None":
    """Each transformer's `norm_matmul.PrenormTransformer` (its stream starts whole: proj_in adds its own bias) in
    the pre-norm form (`prenorm_form`); else None. The pre-norm form always accumulates the residual adds in the
    GEMMs (`residual_gemm`)."""
    if not prenorm_form():
        return None
    out = nn.ModuleList()
    for t in transformers:
        blocks = []
        for blk in t.transformer_blocks:
            a = blk.attn1
            norms = [(n.weight, n.bias, n.eps) for n in (blk.norm1, blk.norm2, blk.norm3)]
            ff = blk.ff.net[0].proj
            blocks.append((norms, fused_qkv_weight(a), blk.attn2.to_q.weight, (ff.weight, ff.bias),
                           (a.to_out[0].bias, blk.attn2.to_out[0].bias, blk.ff.net[2].bias)))
        out.append(norm_matmul.PrenormTransformer(None, blocks, *in_out_matrix(t.proj_out)))
    return out


def _prenorm_transformer(model, pre, x: torch.Tensor, kv: list[torch.Tensor]) -> torch.Tensor:
    """`_transformer` with every LayerNorm inside the GEMM that reads it (`norm_matmul`): norm1 in the Q/K/V
    projection, norm2 in the cross-attention's query, norm3 in the GEGLU. The residual stream h is kept without the
    biases of the projections that write it, so those run as cuBLAS GEMMs accumulating into h (`residual_gemm`);
    `pre` (a `norm_matmul.PrenormTransformer`) holds the folded layers, which add the pending biases back, and
    proj_out's bias with the rest."""
    b, c, height, width = x.shape
    tokens = height * width
    h = model.proj_in(group_norm(x, model.norm))
    inner = h.shape[1]
    h = h.permute(0, 2, 3, 1).reshape(b * tokens, inner)  # rows; a view of the channels_last map

    def per_image(t):  # (B*T, X) -> (B, T, X)
        return t.reshape(b, tokens, t.shape[-1])

    for i, (block, (qkv, to_q, norm_geglu)) in enumerate(zip(model.transformer_blocks, pre.layers)):
        attn1, attn2 = block.attn1, block.attn2
        q, k, v = per_image(qkv(h)).chunk(3, dim=-1)
        a = sdpa(_heads(q, attn1.heads), _heads(k, attn1.heads), _heads(v, attn1.heads))
        h = residual_gemm.accumulate_mm(h, _merge_heads(a).reshape(b * tokens, inner),
                                        in_out_matrix(attn1.to_out[0])[0])
        a = sdpa(_heads(per_image(to_q(h)), attn2.heads), kv[2 * i], kv[2 * i + 1])
        h = residual_gemm.accumulate_mm(h, _merge_heads(a).reshape(b * tokens, inner),
                                        in_out_matrix(attn2.to_out[0])[0])
        h = residual_gemm.accumulate_mm(h, norm_geglu(h), in_out_matrix(block.ff.net[2])[0])
    weight, _ = in_out_matrix(model.proj_out)
    out = residual_gemm.linear_plus_residual(h, weight, pre.proj_out_bias, _rows_of(x))
    return out.reshape(b, height, width, out.shape[-1]).permute(0, 3, 1, 2)


def _transformer(model, qkv_weights, x: torch.Tensor, kv: list[torch.Tensor], pre=None,
                 ff_out: "torch.Tensor | None" = None) -> torch.Tensor:
    """Transformer2DModel (conv proj_in/out) of BasicTransformerBlocks; kv holds (K, V) per block, head-split.

    With pre (a `norm_matmul.PrenormTransformer`): the pre-norm form, `_prenorm_transformer`. Otherwise each
    projection that writes the residual stream (proj_in, both attention outputs) and the LayerNorm after it go
    through `residual_and_norm`: one `linear_norm` kernel where it holds the width (opt-in). ff_out (the model's
    `feed_forward_out_weight`): the last ff2 runs inside proj_out (`residual_gemm.folds_feed_forward`)."""
    if pre is not None:
        return _prenorm_transformer(model, pre, x, kv)
    b, c, height, width = x.shape
    residual = x
    blocks = model.transformer_blocks
    fused = all(linear_norm.holds(*in_out_matrix(layer)) for layer in
                [model.proj_in] + [blk.attn1.to_out[0] for blk in blocks] + [blk.attn2.to_out[0] for blk in blocks])
    if fused:
        h, normed = residual_and_norm(True, *in_out_matrix(model.proj_in), _rows_of(group_norm(x, model.norm)),
                                      None, blocks[0].norm1)
    else:
        h = model.proj_in(group_norm(x, model.norm))
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, h.shape[1])
    inner = h.shape[-1]
    folded = folded_cross.active()  # what `cross_attention_kv` asked too: kv holds (A, B)
    for i, block in enumerate(blocks):
        attn1, attn2 = block.attn1, block.attn2
        proj, ff2 = block.ff.net[0].proj, block.ff.net[2]
        if not fused or i > 0:
            normed = block.norm1(h)
        q, k, v = F.linear(normed, qkv_weights[i]).chunk(3, dim=-1)
        a = sdpa(_heads(q, attn1.heads), _heads(k, attn1.heads), _heads(v, attn1.heads))
        h, normed = residual_and_norm(fused, *in_out_matrix(attn1.to_out[0]), _merge_heads(a), h, block.norm2)
        if folded:  # kv holds (A, B): `folded_cross`
            weight, bias = None, attn2.to_out[0].bias
            a = folded_cross.attend(normed, kv[2 * i], kv[2 * i + 1])
        else:
            weight, bias = in_out_matrix(attn2.to_out[0])
            a = _merge_heads(sdpa(_heads(attn2.to_q(normed), attn2.heads), kv[2 * i], kv[2 * i + 1]))
        # With FEED_FORWARD, h comes back as h + ff2's bias: where ff2 accumulates its product
        accumulate = residual_gemm.FEED_FORWARD
        h, normed = residual_and_norm(fused, weight, bias, a, h, block.norm3, ff2.bias if accumulate else None)
        if ff_out is not None and i == len(blocks) - 1:
            h = geglu(normed, proj.weight, proj.bias, prefix=h)  # [h, g] rows for proj_out's folded weight
        elif accumulate:
            g = geglu(normed, proj.weight, proj.bias)
            h = residual_gemm.accumulate_mm(h.reshape(-1, inner), g.reshape(-1, g.shape[-1]),
                                            ff2.weight.t()).reshape(h.shape)
        else:
            h = ff2(geglu(normed, proj.weight, proj.bias)) + h
    if residual_gemm.PROJ_OUT:
        weight, bias = in_out_matrix(model.proj_out)
        out = residual_gemm.linear_plus_residual(h, weight if ff_out is None else ff_out, bias, _rows_of(residual))
        return out.reshape(b, height, width, out.shape[-1]).permute(0, 3, 1, 2)
    h = h.reshape(b, height, width, inner).permute(0, 3, 1, 2)
    return model.proj_out(h) + residual


# 0: the decoder concatenates its skips, and the twin doubles its first state, with a dim-1 torch.cat (A/B
# measurements)
CAT_CHANNELS_LAST = env_flag("CNRT_CAT_CHANNELS_LAST", True)


def cat_channels(*maps: torch.Tensor) -> torch.Tensor:
    """torch.cat(maps, dim=1) of (N, C_i, H, W) maps, built as (N, H, W, sum C_i) rows: channels_last memory.

    Why: compiled, the decoder's torch.cat([h, skip + control], dim=1) of channels_last maps came out of Inductor as
    a channel-major (NCHW) buffer (its layout is free, and the default is contiguous), written by a transposing
    kernel. Every reader then paid for it: the group norm's statistics read each group's channels 3 KB apart (14.9
    us at 32x48 for a 5.9 MB map) and its apply, which also makes the conv's input and the
    shortcut's channels_last copy, transposed back (H100 sequence, bench/NOTES.md, fourteenth session). Concatenated
    along the last dimension of NHWC views, the buffer is NHWC whatever the compiler picks. H100 loop: 67.89 against
    69.43 ms with CNRT_CAT_CHANNELS_LAST=0."""
    if not CAT_CHANNELS_LAST:
        return torch.cat(maps, dim=1)
    return torch.cat([m.permute(0, 2, 3, 1) for m in maps], dim=3).permute(0, 3, 1, 2)


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): a view when x is channels_last."""
    b, c, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, height * width, c)


def in_out_matrix(layer: nn.Module) -> "tuple[torch.Tensor, torch.Tensor | None]":
    """The (in, out) weight matrix and the bias of a linear map over channels: nn.Linear, a 1x1 nn.Conv2d, or the
    GemmConv2d / Triton swap of one (their weights are (in, out) already)."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        weight = weight.t()
    elif isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.stride != (1, 1) or layer.groups != 1:
            raise ValueError(f"in_out_matrix: {layer} is not a 1x1 convolution")
        weight = weight.reshape(weight.shape[0], -1).t()
    elif weight.dim() != 2:
        raise ValueError(f"in_out_matrix: cannot read a (in, out) matrix from {type(layer).__name__}")
    return weight, layer.bias


@torch.no_grad()
def feed_forward_out_weight(ff2: nn.Module, proj_out: nn.Module) -> torch.Tensor:
    """[Wp; W2 Wp] (5C, C_out) in (in, out) layout: proj_out applied to h + ff2's product, for one GEMM over the
    rows [h, g] (`residual_gemm.folds_feed_forward`). The product is formed in fp32 and rounded once."""
    wp, _ = in_out_matrix(proj_out)
    w2, _ = in_out_matrix(ff2)
    return torch.cat([wp.float(), w2.float() @ wp.float()]).to(wp.dtype).contiguous()


def _transformers_of(net) -> list:
    """Every Transformer2DModel of a UNet / ControlNet in execution order (down, mid, up)."""
    found = []
    for block in list(net.down_blocks) + [net.mid_block] + list(getattr(net, "up_blocks", [])):
        found.extend(getattr(block, "attentions", None) or [])
    return found


def _resnets_of(blocks) -> list:
    return [r for block in blocks for r in block.resnets]


class _FusedQKV(nn.Module):
    """Concatenated to_q/to_k/to_v weights of every self-attention of the given transformers, in order.
    `group(i)` gives the weights of the i-th transformer's blocks."""

    def __init__(self, transformers):
        super().__init__()
        self.weights = nn.ParameterList()
        self.groups: list[list[int]] = []
        for t in transformers:
            self.groups.append([])
            for block in t.transformer_blocks:
                self.groups[-1].append(len(self.weights))
                self.weights.append(nn.Parameter(fused_qkv_weight(block.attn1), requires_grad=False))

    def group(self, i: int) -> list[torch.Tensor]:
        return [self.weights[j] for j in self.groups[i]]


def feed_forward_out_weights(transformers) -> nn.ParameterDict:
    """{str(i): `feed_forward_out_weight`} for each transformer i whose last ff2 runs inside proj_out
    (`residual_gemm.folds_feed_forward`)."""
    return nn.ParameterDict({
        str(i): nn.Parameter(feed_forward_out_weight(t.transformer_blocks[-1].ff.net[2], t.proj_out),
                             requires_grad=False)
        for i, t in enumerate(transformers) if residual_gemm.folds_feed_forward(len(t.transformer_blocks))})


# ---- per-step and per-prompt tables --------------------------------------------------------------------------------

@torch.no_grad()
def time_table(net, resnets, timesteps: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(S, sum C) rows of every resnet's time_emb_proj(silu(time_embedding(time_proj(t_k)))), and the slices."""
    emb = net.time_embedding(net.time_proj(timesteps.to(next(net.parameters()).device)).to(net.dtype))
    cols, slices, start = [], [], 0
    for r in resnets:
        cols.append(r.time_emb_proj(F.silu(emb)))
        slices.append((start, start + cols[-1].shape[1]))
        start += cols[-1].shape[1]
    return torch.cat(cols, dim=1).contiguous(), slices


@torch.no_grad()
def cross_attention_kv(transformers, context: torch.Tensor) -> list[torch.Tensor]:
    """[K_0, V_0, K_1, V_1, ...] (2B, heads, 77, d) for every cross-attention, in transformer order; with
    `folded_cross.active()` the folded [A_0, B_0, A_1, B_1, ...] instead (`folded_cross.fold`)."""
    out = []
    folded = folded_cross.active()
    for t in transformers:
        for block in t.transformer_blocks:
            a = block.attn2
            if folded:
                out.extend(folded_cross.fold(a, context))
                continue
            out.append(_heads(a.to_k(context), a.heads).contiguous())
            out.append(_heads(a.to_v(context), a.heads).contiguous())
    return out


def _kv_counts(transformers) -> list[int]:
    return [2 * len(t.transformer_blocks) for t in transformers]


def _split(items: list, counts: list[int]) -> list[list]:
    out, i = [], 0
    for n in counts:
        out.append(items[i : i + n])
        i += n
    return out


# ---- the three parts -----------------------------------------------------------------------------------------------

class _Encoder(nn.Module):
    """The down path + mid block of a UNet or ControlNet (identical structure), walked with the precomputed tables.

    runnable=False keeps only the layout (resnets, transformers, slices) that the time tables and K/V need, without
    the fused Q/K/V weight copies: for the twin encoder, which runs both networks from its own stacked weights."""

    def __init__(self, net, transformers, runnable: bool = True):
        super().__init__()
        self.net = net
        self.transformers = transformers
        self.qkv = _FusedQKV(transformers) if runnable else None
        self.resnets = _resnets_of(list(net.down_blocks) + [net.mid_block])
        self.kv_counts = _kv_counts(transformers)
        self.slices: list[tuple[int, int]] = []

    def encode(self, h, temb, kv: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h: conv_in output (2B) -> (mid-block output, the 12 states the skips / zero-convs take)."""
        kvs = iter(_split(kv, self.kv_counts))
        tis = iter(range(len(self.kv_counts)))
        ts = iter(self.slices)
        states = [h]
        for block in self.net.down_blocks:
            attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, attn in zip(block.resnets, attns):
                s = next(ts)
                h = _resnet(resnet, h, temb[s[0]:s[1]])
                if attn is not None:
                    h = _transformer(attn, self.qkv.group(next(tis)), h, next(kvs))
                states.append(h)
            for down in block.downsamplers or []:
                h = down.conv(h)
                states.append(h)
        mid = self.net.mid_block
        s = next(ts)
        h = _resnet(mid.resnets[0], h, temb[s[0]:s[1]])
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            h = _transformer(attn, self.qkv.group(next(tis)), h, next(kvs))
            s = next(ts)
            h = _resnet(resnet, h, temb[s[0]:s[1]])
        return h, states


def control_rows(scales: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """(2, 13) control scales (cond, uncond) -> (2B, 13, 1, 1, 1): one row per image of the CFG batch."""
    return scales.to(dtype).repeat_interleave(batch, dim=0)[:, :, None, None, None]


class ControlBranch(_Encoder):
    """x (B,4,h,w) fp32, hint_features (B,C0,h,w), temb row, K/V list -> the 13 zero-convolution outputs (2B),
    unscaled: UNetDecoder applies the control scales where it adds them (no kernel of their own)."""

    def __init__(self, controlnet, runnable: bool = True):
        super().__init__(controlnet, _transformers_of(controlnet), runnable)

    def forward(self, x, hint_features, temb, kv: list[torch.Tensor]):
        net = self.net
        dtype = net.conv_in.weight.dtype
        h = net.conv_in(x.to(dtype)) + hint_features  # identical for cond and uncond: compute once, then double
        mid, states = self.encode(torch.cat([h, h]), temb, kv)
        return [zc(r) for r, zc in zip(states, net.controlnet_down_blocks)] + [net.controlnet_mid_block(mid)]


class UNetEncoder(_Encoder):
    """x (B,4,h,w) fp32, temb row, K/V list -> (mid-block output, 12 skip tensors), all batch 2B."""

    def __init__(self, unet, runnable: bool = True):
        up = _transformers_of_up(unet)
        super().__init__(unet, [t for t in _transformers_of(unet) if t not in up], runnable)

    def forward(self, x, temb, kv: list[torch.Tensor]):
        h = self.net.conv_in(x.to(self.net.conv_in.weight.dtype))
        return self.encode(torch.cat([h, h]), temb, kv)


def _transformers_of_up(unet) -> list:
    return [t for block in unet.up_blocks for t in (getattr(block, "attentions", None) or [])]


class UNetDecoder(nn.Module):
    """UNet up path with the control residuals (the ControlNet's 13 unscaled outputs, times control_scales (2, 13)),
    then CFG and the DDIM update -> x_prev (B,4,h,w) fp32.

    fused: resnet index (in up-path order) -> a module computing that block as fused_resnet.FusedResnet does
    (called with conv1.bias + time embedding); the others run as diffusers' blocks. Upsamplers run as 2x2
    convolutions where `subpixel.convolutions(unet, latent_size)` has one (latent_size (h, w) picks by map size)."""

    def __init__(self, unet, fused: "dict[int, nn.Module] | None" = None,
                 latent_size: "tuple[int, int] | None" = None):
        super().__init__()
        self.net = unet
        self.fused = nn.ModuleDict({str(i): m for i, m in (fused or {}).items()})
        self.fused_indices = frozenset((fused or {}).keys())
        self.transformers = _transformers_of_up(unet)
        self.prenorm = prenorm_transformers(self.transformers)
        self.qkv = _FusedQKV(self.transformers) if self.prenorm is None else None
        self.ff_out = feed_forward_out_weights(self.transformers) if self.prenorm is None else nn.ParameterDict()
        self.resnets = _resnets_of(list(unet.up_blocks))
        self.kv_counts = _kv_counts(self.transformers)
        self.slices: list[tuple[int, int]] = []
        self.subpixel = subpixel.convolutions(unet, latent_size)

    def forward(self, x, mid, skips: list[torch.Tensor], controls: list[torch.Tensor], control_scales, temb,
                kv: list[torch.Tensor], coeffs, guidance_scale):
        net = self.net
        rows = control_rows(control_scales, x.shape[0], mid.dtype)
        h = mid + controls[-1] * rows[:, -1]
        skips = [s + c * rows[:, i] for i, (s, c) in enumerate(zip(skips, controls[:-1]))]
        kvs = iter(_split(kv, self.kv_counts))
        tis = iter(range(len(self.kv_counts)))
        ts = iter(enumerate(self.slices))
        ups = itertools.count()  # upsampler positions, the keys of self.subpixel
        for block in net.up_blocks:
            attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, attn in zip(block.resnets, attns):
                h = cat_channels(h, skips.pop())
                i, s = next(ts)
                if i in self.fused_indices:
                    h = self.fused[str(i)](h, temb[s[0]:s[1]])
                else:
                    h = _resnet(resnet, h, temb[s[0]:s[1]])
                if attn is not None:
                    t = next(tis)
                    if self.prenorm is not None:
                        h = _transformer(attn, None, h, next(kvs), self.prenorm[t])
                    else:
                        h = _transformer(attn, self.qkv.group(t), h, next(kvs),
                                         ff_out=self.ff_out[str(t)] if str(t) in self.ff_out else None)
            for up in block.upsamplers or []:
                key = str(next(ups))
                h = subpixel.upsample_conv(up, h, self.subpixel[key] if key in self.subpixel else None)
        eps = net.conv_out(F.silu(group_norm(h, net.conv_norm_out))).float()
        e_cond, e_uncond = eps.chunk(2)
        return ddim_update(x, cfg_mix(e_cond, e_uncond, guidance_scale.reshape(1, 1, 1, 1)), coeffs)

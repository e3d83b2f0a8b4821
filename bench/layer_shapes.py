"""`python3 -m bench.layer_shapes`: every convolution and Linear shape of one fused step, timed alone on the GPU.

For each distinct convolution: cuDNN (channels_last, as the compiled parts call it) against im2col + cuBLAS GEMM
(`engines.torch_fast.gemm_conv`, compiled so the gather is one kernel), and the bare GEMM. For each Linear: cuBLAS
time against its floor. Every layer is timed inside a CUDA graph over 4 rotating copies of its weights and inputs
(more than the L2 holds for the deep layers), as a step streams its weights once. Prints per-shape rows, then what
converting the convolutions below a map size would save per step (sum over the layers of one step).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch_fast import conv_tuning, triton_conv
from engines.torch_fast.gemm_conv import gemm_conv2d
from engines.torch_fast.runner import build_fast_engines
from models.loader import load_bundle
from profiles.config import get_profile

ROTATE = 4
REPEAT = 5
PEAK_TFLOPS, PEAK_TBS = 790.0, 4.3  # measured ceilings on this workplace's H100/H200 (bf16 GEMM, d2d copy)


def graph_time_us(make_call, copies: int = ROTATE, repeat: int = REPEAT) -> float:
    return conv_tuning.graph_time_us(make_call, copies, repeat)


def record_layers(step) -> tuple[collections.Counter, collections.Counter]:
    """(conv key -> count, linear key -> count) over one step of the eager fast runner."""
    convs, linears = collections.Counter(), collections.Counter()

    def conv_hook(mod, args):
        n, c, h, w = args[0].shape
        convs[(n, c, h, w, mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0])] += 1

    def linear_hook(mod, args):
        x = args[0]
        linears[(x.numel() // x.shape[-1], mod.in_features, mod.out_features)] += 1

    hooks = []
    for net in (step.cn.net, step.enc.net):
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_pre_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                hooks.append(m.register_forward_pre_hook(linear_hook))
    b, c, h, w = step.profile.latent_shape
    x = torch.randn(b, c, h, w, device=step.device)
    with torch.no_grad():
        step.step(x, 0)
    for hk in hooks:
        hk.remove()
    return convs, linears


def gemm_conv2d_unfold(x, weight, bias, kernel_size, stride, padding):
    """Variant of gemm_conv2d: im2col through Tensor.unfold views of the padded map (one strided copy)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    rows = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))
    patches = rows.unfold(1, kh, sh).unfold(2, kw, sw)  # (N, oh, ow, C, kh, kw)
    oh, ow = patches.shape[1], patches.shape[2]
    cols = patches.permute(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * c)
    out = torch.addmm(bias, cols, weight)
    return out.reshape(n, oh, ow, weight.shape[1]).permute(0, 3, 1, 2)


def time_conv(key, variants: dict) -> dict:
    n, cin, h, w, cout, k, s, p = key
    dev = "cuda"
    xs = [torch.randn(n, cin, h, w, device=dev, dtype=torch.half).to(memory_format=torch.channels_last)
          for _ in range(ROTATE)]
    ws = [torch.randn(cout, cin, k, k, device=dev, dtype=torch.half).to(memory_format=torch.channels_last) * 0.02
          for _ in range(ROTATE)]
    bs = [torch.randn(cout, device=dev, dtype=torch.half) for _ in range(ROTATE)]
    mats = [triton_conv.weight_matrix(w) for w in ws]
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    cols = [torch.randn(n * oh * ow, k * k * cin, device=dev, dtype=torch.half) for _ in range(ROTATE)]
    ref = F.conv2d(xs[0], ws[0], bs[0], s, p).float()
    row = {"cudnn_us": graph_time_us(lambda i: lambda: F.conv2d(xs[i], ws[i], bs[i], s, p)),
           "mm_only_us": graph_time_us(lambda i: lambda: torch.addmm(bs[i], cols[i], mats[i]))}
    for name, fn in variants.items():
        got = fn(xs[0], mats[0], bs[0], (k, k), (s, s), (p, p)).float()
        row[f"{name}_err"] = ((got - ref).norm() / ref.norm()).item()
        row[f"{name}_us"] = graph_time_us(lambda i: lambda: fn(xs[i], mats[i], bs[i], (k, k), (s, s), (p, p)))
    row["gemm_us"] = min(row[f"{name}_us"] for name in variants)
    row["rel_err"] = max(row[f"{name}_err"] for name in variants)
    m, kk = n * oh * ow, k * k * cin
    row.update(M=m, K=kk, N=cout, gflop=2 * m * kk * cout / 1e9, weight_mb=kk * cout * 2 / 1e6)
    row["floor_us"] = max(row["gflop"] / PEAK_TFLOPS * 1e3, row["weight_mb"] / PEAK_TBS)
    return row


def time_linear(key) -> dict:
    m, k, n = key
    xs = [torch.randn(m, k, device="cuda", dtype=torch.half) for _ in range(ROTATE)]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.half) * 0.02 for _ in range(ROTATE)]
    with torch.no_grad():
        us = graph_time_us(lambda i: lambda: F.linear(xs[i], ws[i]))
    gflop, mb = 2 * m * k * n / 1e9, k * n * 2 / 1e6
    return {"M": m, "K": k, "N": n, "us": us, "gflop": gflop, "weight_mb": mb,
            "floor_us": max(gflop / PEAK_TFLOPS * 1e3, mb / PEAK_TBS)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="256x384-fp16")
    p.add_argument("--weights", default="synthetic")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch._dynamo.config as dcfg

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, 512)
    profile = get_profile(a.profile)
    os.environ["CNRT_CONV"], os.environ["CNRT_STEP"] = "cudnn", "streams"  # the step's original layers
    bundle = load_bundle(a.weights)
    engines = build_fast_engines(bundle, profile, torch.device("cuda"), os.path.join("build", "layer_shapes"),
                                 compile_mode="eager")
    step = engines.step
    ctx = torch.randn(profile.cfg_batch, 77, bundle.context_dim, device="cuda")
    b, _, h, w = profile.latent_shape
    step.prepare(ctx, torch.randn(b, step.hint_channels, h, w, device="cuda"), 9.0, torch.ones(2, 13))
    convs, linears = record_layers(step)
    variants = {
        "cat": torch.compile(gemm_conv2d, fullgraph=True, dynamic=False),
        "catfp": torch.compile(gemm_conv2d, fullgraph=True, dynamic=False, options={"force_pointwise_cat": True}),
        "unfold": torch.compile(gemm_conv2d_unfold, fullgraph=True, dynamic=False),
    }

    rows = []
    print(f"{'conv N,Cin,H,W->Cout k s':<34}{'x':>3}{'M':>6}{'K':>7}{'cuDNN us':>10}"
          + "".join(f"{n:>8}" for n in variants) + f"{'mm us':>8}{'floor':>7}{'err':>9}", flush=True)
    for key, count in sorted(convs.items(), key=lambda kv: (kv[0][2] * kv[0][3], kv[0][1])):
        with torch.no_grad():
            r = time_conv(key, variants)
        r.update(key=list(key), count=count)
        rows.append(r)
        n, cin, h_, w_, cout, k, s, _ = key
        print(f"{f'{n},{cin},{h_},{w_}->{cout} k{k} s{s}':<34}{count:>3}{r['M']:>6}{r['K']:>7}{r['cudnn_us']:>10.1f}"
              + "".join(f"{r[f'{v}_us']:>8.1f}" for v in variants)
              + f"{r['mm_only_us']:>8.1f}{r['floor_us']:>7.1f}{r['rel_err']:>9.1e}", flush=True)
    lin_rows = []
    print(f"\n{'linear M,K,N':<24}{'x':>3}{'us':>9}{'floor':>8}{'TFLOP/s':>9}", flush=True)
    for key, count in sorted(linears.items()):
        r = time_linear(key)
        r.update(key=list(key), count=count)
        lin_rows.append(r)
        print(f"{str(key):<24}{count:>3}{r['us']:>9.1f}{r['floor_us']:>8.1f}{r['gflop'] / r['us'] * 1e3:>9.0f}",
              flush=True)

    def total(field, rows_, pick=lambda r: True):
        return sum(r[field] * r["count"] for r in rows_ if pick(r)) / 1e3

    print(f"\nper step (one stream, sum of layers alone): convs cuDNN {total('cudnn_us', rows):.2f} ms, "
          f"floor {total('floor_us', rows):.2f} ms; linears {total('us', lin_rows):.2f} ms, "
          f"floor {total('floor_us', lin_rows):.2f} ms")
    for max_px in (0, 24, 96, 384, 1536):
        conv_ms = sum((r["gemm_us"] if r["key"][2] * r["key"][3] <= max_px else r["cudnn_us"]) * r["count"]
                      for r in rows) / 1e3
        print(f"  convs with gemm at <= {max_px:>4} px per map: {conv_ms:.2f} ms per step")
    best = sum(min(r["gemm_us"], r["cudnn_us"]) * r["count"] for r in rows) / 1e3
    print(f"  convs, best of cuDNN and gemm per shape: {best:.2f} ms per step")
    for v in variants:
        print(f"  gemm variant {v}, all convs: {total(f'{v}_us', rows):.2f} ms per step")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "convs": rows, "linears": lin_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python3 -m bench.cudnn_frontend_conv`: every cuDNN engine the graph API offers for the step's 3x3 convolutions.

Why: torch reaches cuDNN through its legacy convolution API, which ran Ampere-era implicit-GEMM kernels on the H100
(sm80_xmma_..., bench/NOTES.md) and lost to our Triton kernels on every shape. cuDNN 9's graph API (the
cudnn-frontend package, carried as a wheel) can enumerate all engine configs for a convolution, Hopper-native ones
included. This script builds one graph per shape (NHWC fp16 in and out, KRSC weights, fp32 accumulation), builds
the first --max-plans configs the heuristics (modes A, B and the fallback list) propose, and checks and times each
as the conv tuner does (`conv_tuning.measure_graph_api_plan`), beside our Triton kernel with the tuned table's config
and torch's own cuDNN call, in the same process.

Here twin shapes (g2: two weight sets) are timed as one convolution over all images with one weight: the same work.
`--upgrade-table` runs the tuner's own path instead (pairs as one call per network on two streams).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from engines.torch_fast import conv_tuning, cudnn_conv
from engines.torch_fast.compile import device_artifact_dir
from engines.torch_fast.conv_tuning import (ConvChoice, ConvShape, TuningTable, conv_inputs, graph_time_us,
                                            measure_graph_api_plan, triton_call)

from bench.conv_tma import TORCH_ARTIFACTS

DEFAULT_KEYS = (
    "1x320x32x48->320 k3 s1 p1 g2", "2x320x32x48->320 k3 s1 p1 g2", "2x640x32x48->320 k3 s1 p1",
    "2x960x32x48->320 k3 s1 p1", "2x320x16x24->640 k3 s1 p1 g2", "2x640x16x24->640 k3 s1 p1 g2",
    "2x960x16x24->640 k3 s1 p1", "2x1280x16x24->640 k3 s1 p1", "2x1920x16x24->640 k3 s1 p1",
    "2x1280x8x12->1280 k3 s1 p1", "2x1280x8x12->1280 k3 s1 p1 g2", "2x2560x8x12->1280 k3 s1 p1",
    "2x2560x4x6->1280 k3 s1 p1",
)


def bench_shape(s: ConvShape, table: "TuningTable | None", max_plans: int) -> dict:
    n = s.n * s.groups
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    copies = 3
    xs = [torch.randn(n, s.c, s.h, s.w, device=dev, dtype=torch.half, generator=gen)
          .contiguous(memory_format=torch.channels_last) for _ in range(copies)]
    ws = [(torch.randn(s.cout, s.c, s.kernel, s.kernel, device=dev, dtype=torch.half, generator=gen) * 0.02)
          .contiguous(memory_format=torch.channels_last) for _ in range(copies)]
    ref = F.conv2d(xs[0], ws[0], stride=s.stride, padding=s.padding).float()
    flop = 2.0 * n * s.h * s.w * s.cout * s.c * s.kernel * s.kernel / s.stride ** 2
    row = {"shape": s.key, "gflop": flop / 1e9}
    row["torch_cudnn_us"] = graph_time_us(lambda i: lambda: F.conv2d(xs[i], ws[i], stride=s.stride, padding=s.padding))
    if table is not None and s.key in table.choices and table.choices[s.key].config is not None:
        t = conv_inputs(s)
        cfg = table.choices[s.key].config
        row["triton_us"] = graph_time_us(lambda i: lambda: triton_call(s, t, i, cfg))
        row["triton_cfg"] = str(cfg)
    names = cudnn_conv.plan_names(xs[0], ws[0], s.padding, s.stride)
    plans = [{"index": i, "name": name,
              **measure_graph_api_plan(lambda j, name=name: lambda: cudnn_conv.run(xs[j], ws[j], s.padding, name,
                                                                                   stride=s.stride),
                                       ref)}
             for i, name in enumerate(names[:max_plans])]
    ok = [p for p in plans if "us" in p and p["us"] == p["us"]]
    row["plans"] = plans
    row["plan_count"] = len(names)
    if ok:
        best = min(ok, key=lambda p: p["us"])
        row["cudnn_fe_us"], row["cudnn_fe_plan"] = best["us"], best["name"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=list(DEFAULT_KEYS), help="conv tuning table keys")
    p.add_argument("--max-plans", type=int, default=40, help="at most this many plans a shape")
    p.add_argument("--verbose", action="store_true", help="print every plan")
    p.add_argument("--upgrade-table", default=None, help="only this: time the graph API's configs for every shape "
                   "of this GPU's table the tuner would try them on (conv_tuning.add_graph_api_choices) and save the "
                   "table to this file (--shapes: only those)")
    p.add_argument("--write", default=None, help="save this GPU's table, with the shapes where a cuDNN graph-API "
                                                 "config beat Triton in this run moved to it, to this file")
    a = p.parse_args(argv)
    if not cudnn_conv.available():
        print("cuDNN graph API unavailable (no nvidia-cudnn-frontend package or no GPU)", flush=True)
        return 1
    print(f"cudnn-frontend / cuDNN backend: {cudnn_conv.version()}", flush=True)
    path = device_artifact_dir(TORCH_ARTIFACTS, torch.device("cuda")) / conv_tuning.TABLE_FILE
    table = TuningTable.load(path) if path.exists() else None
    if a.upgrade_table:
        keys = None if a.shapes == list(DEFAULT_KEYS) else set(a.shapes)
        upgraded = conv_tuning.add_graph_api_choices(table, log=lambda m: print(m, flush=True), keys=keys)
        upgraded.save(Path(a.upgrade_table))
        print(f"wrote {a.upgrade_table}: {upgraded.summary()}", flush=True)
        return 0
    print(f"{'shape':34s} {'GFLOP':>6s} {'torch':>7s} {'triton':>7s} {'cudnn-fe':>8s} {'TFLOP/s':>7s}  plan",
          flush=True)
    moved = []
    for key in a.shapes:
        s = ConvShape.from_key(key)
        try:
            row = bench_shape(s, table, a.max_plans)
        except Exception as e:  # noqa: BLE001
            print(f"{key:34s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        fe = row.get("cudnn_fe_us", float("nan"))
        print(f"{key:34s} {row['gflop']:6.2f} {row['torch_cudnn_us']:7.1f} {row.get('triton_us', float('nan')):7.1f} "
              f"{fe:8.1f} {row['gflop'] / fe * 1e3 if fe == fe else float('nan'):7.0f}  "
              f"{row.get('cudnn_fe_plan', '-')} ({row['plan_count']} plans)", flush=True)
        if a.verbose:
            for plan in row["plans"]:
                print(f"    {plan}", flush=True)
        triton_us = row.get("triton_us", float("inf"))
        if table is not None and s.groups == 1 and not s.shortcut and fe < triton_us:
            table.choices[key] = ConvChoice("cudnn_graph", None, row["torch_cudnn_us"], fe, row["cudnn_fe_plan"])
            moved.append(key)
    if a.write and table is not None:
        table.save(Path(a.write))
        print(f"wrote {a.write}: {len(moved)} shapes on cuDNN graph-API configs ({', '.join(moved)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

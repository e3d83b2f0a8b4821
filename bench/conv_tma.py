"""`python3 -m bench.conv_tma`: the TMA convolution kernel against the tuned gather kernel, shape by shape.

For each 3x3 shape of the step (from the conv tuning table carried in build/), times the table's choice and the
TMA kernel (`triton_conv._conv_tma_kernel`: A tiles as bulk tensor copies of a rectangle of the map, zero-filled
at the border by the copy engine) over a set of output boxes, tiles and K splits, as the tuner times them (CUDA
graph, rotating inputs, kernel + one split-K reduction). Also checks that the TMA kernel compiles inside a
torch.compile(fullgraph) function and agrees with cuDNN.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from engines.torch_fast import triton_conv
from engines.torch_fast.conv_tuning import ConvChoice, ConvShape, TuningTable, graph_time_us
from engines.torch_fast.triton_conv import ConvConfig

TABLE = Path("build/256x384-fp16/torch/conv_tuning.json")
_KEY = re.compile(r"(\d+)x(\d+)x(\d+)x(\d+)->(\d+) k(\d) s(\d) p(\d)(?: g(\d))?(?: \+1x1\((\d+)\))?")


def parse_key(key: str) -> ConvShape:
    n, c, h, w, cout, k, s, p, g, sc = _KEY.fullmatch(key).groups()
    return ConvShape(int(n), int(c), int(h), int(w), int(cout), int(k), int(s), int(p), int(g or 1), int(sc or 0))


def tensors(s: ConvShape, copies: int = 3):
    dev, g = torch.device("cuda"), s.groups
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(g * s.n, s.c, s.h, s.w, device=dev, dtype=torch.half, generator=gen)
          .contiguous(memory_format=torch.channels_last) for _ in range(copies)]
    x2s = [None] * copies
    if s.shortcut:
        x2s = [torch.randn(g * s.n, s.shortcut, s.h, s.w, device=dev, dtype=torch.half, generator=gen)
               .contiguous(memory_format=torch.channels_last) for _ in range(copies)]
    rows = s.kernel * s.kernel * s.c + s.shortcut
    mats = [torch.randn(g, rows, s.cout, device=dev, dtype=torch.half, generator=gen) * 0.02 for _ in range(copies)]
    bs = [torch.randn(g, s.cout, device=dev, dtype=torch.half, generator=gen) for _ in range(copies)]
    if g == 1:
        mats, bs = [m[0] for m in mats], [b[0] for b in bs]
    return xs, x2s, mats, bs


def time_config(s: ConvShape, t, cfg: ConvConfig) -> float:
    xs, x2s, mats, bs = t
    return graph_time_us(lambda i: lambda: triton_conv.conv2d_nhwc(
        xs[i], mats[i], bs[i], s.kernel, s.stride, s.padding, cfg, groups=s.groups, shortcut=x2s[i], sum_only=True))


def error(s: ConvShape, t, cfg: ConvConfig) -> float:
    xs, x2s, mats, bs = t
    got = triton_conv.conv2d_nhwc(xs[0], mats[0], bs[0], s.kernel, s.stride, s.padding, cfg, groups=s.groups,
                                  shortcut=x2s[0]).float()
    ref = triton_conv.conv2d_nhwc(xs[0], mats[0], bs[0], s.kernel, s.stride, s.padding,
                                  ConvConfig(64, 64, 64, 1, 4, 3), groups=s.groups, shortcut=x2s[0]).float()
    return ((got - ref).norm() / ref.norm()).item()


def compile_check() -> None:
    """The TMA kernel called inside torch.compile(fullgraph=True) and a CUDA graph gives cuDNN's result."""
    x = torch.randn(2, 320, 32, 48, device="cuda", dtype=torch.half).contiguous(memory_format=torch.channels_last)
    w = torch.randn(320, 320, 3, 3, device="cuda", dtype=torch.half) * 0.02
    b = torch.randn(320, device="cuda", dtype=torch.half)
    mat = triton_conv.weight_matrix(w)
    cfg = ConvConfig(128, 128, 64, 3, 8, 3, box=(1, 8, 16))

    def f(x):
        return torch.nn.functional.silu(triton_conv.conv2d_nhwc(x, mat, b, 3, 1, 1, cfg))

    g = torch.compile(f, fullgraph=True)
    got = g(x).float()
    ref = torch.nn.functional.silu(F.conv2d(x, w, b, padding=1)).float()
    print(f"compile check: relative error {((got - ref).norm() / ref.norm()).item():.2e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=None, help="table keys (default: every stride-1 shape)")
    p.add_argument("--table", default=str(TABLE))
    p.add_argument("--write", default=None, help="save the table with each shape's faster choice to this file")
    a = p.parse_args(argv)
    compile_check()
    table = TuningTable.load(Path(a.table))
    keys = a.shapes or [k for k in table.choices if " s1 " in k and "->4 " not in k]
    total_old = total_new = 0.0
    for key in keys:
        s = parse_key(key)
        t = tensors(s)
        choice = table.choices[key]
        old_us = time_config(s, t, choice.config) if choice.config is not None else choice.cudnn_us
        best = (old_us, choice.config)
        for cfg in triton_conv.tma_candidate_configs(s.n, s.h, s.w, s.cout, s.c, s.kernel, s.shortcut, s.groups):
            try:
                us = time_config(s, t, cfg)
            except Exception as e:  # a config Triton cannot compile (shared memory, registers)
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if us < best[0]:
                best = (us, cfg)
        err = error(s, t, best[1]) if best[1] is not None and best[1].box is not None else 0.0
        total_old += old_us
        total_new += best[0]
        if best[1] is not None and best[1] != choice.config:
            table.choices[key] = ConvChoice("triton", best[1], choice.cudnn_us, best[0])
        print(f"{key:<44} table {old_us:6.1f} us -> best {best[0]:6.1f} us  {best[1]}  err {err:.1e}", flush=True)
    print(f"sum over {len(keys)} shapes (one call each): {total_old:.0f} -> {total_new:.0f} us")
    if a.write:
        table.save(Path(a.write))
        print(f"wrote {a.write}: {table.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

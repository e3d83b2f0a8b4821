"""`python3 -m bench.conv_tma`: the TMA convolution kernel against the tuned gather kernel, shape by shape.

For each 3x3 shape of the step (from the conv tuning table carried in build/), times the table's choice and the
TMA kernel (`triton_conv._conv_tma_kernel`: A tiles as bulk tensor copies of a rectangle of the map, zero-filled
at the border by the copy engine) over a set of output boxes, tiles and K splits, as the tuner times them (CUDA
graph, rotating inputs, kernel + one split-K reduction; a config off cuDNN by more than the tuner allows is
skipped, as there). Also checks that the TMA kernel compiles inside a torch.compile(fullgraph) function and agrees
with cuDNN.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from engines.torch_fast import conv_tuning, triton_conv
from engines.torch_fast.compile import device_artifact_dir
from engines.torch_fast.conv_tuning import (MAX_RELATIVE_ERROR, ConvChoice, ConvShape, TuningTable,
                                            conv_inputs, cudnn_call, graph_time_us, relative_error,
                                            triton_call)
from engines.torch_fast.triton_conv import ConvConfig

TORCH_ARTIFACTS = Path("build/256x384-fp16/torch")  # one directory per GPU model (compile.device_artifact_dir)


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
    print(f"compile check: relative error {relative_error(got, ref):.2e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=None, help="table keys (default: every stride-1 shape)")
    p.add_argument("--table", default=None, help="default: this GPU's table under " + str(TORCH_ARTIFACTS))
    p.add_argument("--write", default=None, help="save the table with each shape's faster choice to this file")
    a = p.parse_args(argv)
    compile_check()
    path = Path(a.table) if a.table else (device_artifact_dir(TORCH_ARTIFACTS, torch.device("cuda"))
                                          / conv_tuning.TABLE_FILE)
    table = TuningTable.load(path)
    keys = a.shapes or [k for k in table.choices if " s1 " in k and "->4 " not in k]
    total_old = total_new = 0.0
    for key in keys:
        s = ConvShape.from_key(key)
        t = conv_inputs(s)
        ref = cudnn_call(s, t, 0).float()
        choice = table.choices[key]
        old_us = (graph_time_us(lambda i: lambda: triton_call(s, t, i, choice.config))
                  if choice.config is not None else choice.cudnn_us)
        best, best_err = (old_us, choice.config), None  # the table's own choice: not re-checked here
        for cfg in triton_conv.tma_candidate_configs(s.n, s.h, s.w, s.cout, s.c, s.kernel, s.shortcut, s.groups):
            try:
                err = relative_error(triton_call(s, t, 0, cfg, sum_only=False), ref)
                if not err < MAX_RELATIVE_ERROR:  # as the tuner: a wrong config is never chosen
                    print(f"  {cfg}: relative error {err:.2e} against cuDNN, skipped", flush=True)
                    continue
                us = graph_time_us(lambda i, cfg=cfg: lambda: triton_call(s, t, i, cfg))
            except Exception as e:  # a config Triton cannot compile (shared memory, registers)
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if us < best[0]:
                best, best_err = (us, cfg), err
        total_old += old_us
        total_new += best[0]
        if best[1] is not None and best[1] != choice.config:
            table.choices[key] = ConvChoice("triton", best[1], choice.cudnn_us, best[0])
        err = "" if best_err is None else f"  err vs cuDNN {best_err:.1e}"
        print(f"{key:<44} table {old_us:6.1f} us -> best {best[0]:6.1f} us  {best[1]}{err}", flush=True)
    print(f"sum over {len(keys)} shapes (one call each): {total_old:.0f} -> {total_new:.0f} us")
    if a.write:
        table.save(Path(a.write))
        print(f"wrote {a.write}: {table.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

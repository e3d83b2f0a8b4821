"""Per-shape choice of convolution kernel, measured once on the GPU and kept as a JSON artifact.

For every distinct 3x3 convolution of the step (input shape, Cout, stride) this times cuDNN against the Triton
implicit-GEMM kernels (`triton_conv`: the gather kernel and, at stride 1, the TMA kernel) over their candidate
configs and, for plain stride-1 shapes where the cudnn-frontend package is installed, against the engine configs of
cuDNN's graph API (`cudnn_conv`), and records the fastest; a config whose result disagrees with cuDNN is skipped. A
split-K config is timed with one reduction of its partial sums and no separate bias / residual / cast kernels:
inside a compiled part those fuse into the reduction and its consumer (timing them eagerly, as before 2026-11-26,
charged each split 2-3 extra launches and steered the big-K 32x48 shapes away from the large tiles they need).
Timing follows bench/METHOD: CUDA-graph replays of several calls over rotating weight and input copies (deep layers'
weights are bigger than L2, as in the real step, which streams each weight once), median of 10 replays. The table is
part of the compiled artifact: `build_fast_engines` tunes when no table matches the manifest key.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from artifacts import atomic_file
from engines.torch_fast import cudnn_conv, triton_conv
from engines.torch_fast.triton_conv import ConvConfig

TABLE_FILE = "conv_tuning.json"
# Bump when what is timed or the search space changes: part of the artifact key, so old tables are re-measured.
# 3: TMA kernel configs (session 6); 4: cuDNN graph-API configs; 5: also for twin pairs (session 15); 6: also with a
# 1x1 shortcut and at stride 2 (session 16)
TUNING_VERSION = 6
_ROTATE = 3
_REPEAT = 4
# A Triton config whose result is further than this from cuDNN's (relative L2) is never chosen: correct configs
# land near 1e-4; 8-warp TMA configs with the shortcut loop gave 6.5e-3 to 1.5e-2 (triton_conv)
MAX_RELATIVE_ERROR = 2e-3
# cuDNN graph-API engine configs timed per shape (the heuristics' ranking first; 119 were offered for each 32x48 and
# 16x24 shape on an H200, and the best of the first 24 won by up to 35%: bench/NOTES.md, session 15)
GRAPH_API_PLANS = 64
# A graph-API conv2 with a 1x1 shortcut is two kernels (cuDNN's, then cuBLAS's GEMM into its output) where the Triton
# kernel is one. On an H100 the two choices that won by under 1 us in isolation made the decoder part slower in the
# loop (bench/NOTES.md, session 16; why was not measured), so such a choice must win by this much.
SHORTCUT_MARGIN_US = 2.0
# Strides whose 3x3 shapes are offered to the graph API's configs (the step runs stride 2 only in the twin's
# downsampler pairs)
GRAPH_API_STRIDES = (1, 2)
_KEY = re.compile(r"(\d+)x(\d+)x(\d+)x(\d+)->(\d+) k(\d+) s(\d+) p(\d+)(?: g(\d+))?(?: \+1x1\((\d+)\))?")


@dataclass(frozen=True)
class ConvShape:
    """One 3x3 (or kxk) convolution of the step: input (N, C, H, W) -> Cout, square kernel, stride, padding;
    groups > 1: that many independent convolutions (own weights) over N images each, in one launch;
    shortcut > 0: plus a 1x1 convolution of a second input with that many channels (a fused ResNet conv2)."""

    n: int
    c: int
    h: int
    w: int
    cout: int
    kernel: int
    stride: int
    padding: int
    groups: int = 1
    shortcut: int = 0

    @classmethod
    def of(cls, conv, input_shape: tuple[int, ...], groups: int = 1, shortcut: int = 0) -> "ConvShape":
        """The shape a square-kernel nn.Conv2d runs at, from its recorded input shape (N, C, H, W)."""
        n, c, h, w = input_shape
        return cls(n, c, h, w, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0], groups,
                   shortcut)

    @classmethod
    def from_key(cls, key: str) -> "ConvShape":
        """The shape a tuning table's key names (the inverse of `key`)."""
        n, c, h, w, cout, k, stride, pad, groups, shortcut = _KEY.fullmatch(key).groups()
        return cls(int(n), int(c), int(h), int(w), int(cout), int(k), int(stride), int(pad), int(groups or 1),
                   int(shortcut or 0))

    @property
    def key(self) -> str:
        key = f"{self.n}x{self.c}x{self.h}x{self.w}->{self.cout} k{self.kernel} s{self.stride} p{self.padding}"
        if self.groups != 1:
            key += f" g{self.groups}"
        return key if not self.shortcut else f"{key} +1x1({self.shortcut})"


@dataclass
class ConvChoice:
    backend: str  # "triton", "cudnn" (torch's call) or "cudnn_graph" (cuDNN graph API, engine config `plan`)
    config: "ConvConfig | None"
    cudnn_us: float
    best_us: float
    plan: "str | None" = None

    def as_dict(self) -> dict:
        d = {"backend": self.backend, "config": None if self.config is None else self.config.as_dict(),
             "cudnn_us": self.cudnn_us, "best_us": self.best_us}
        if self.plan is not None:
            d["plan"] = self.plan
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ConvChoice":
        return cls(d["backend"], None if d["config"] is None else ConvConfig(**d["config"]), d["cudnn_us"],
                   d["best_us"], d.get("plan"))


@dataclass
class TuningTable:
    choices: dict[str, ConvChoice] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({k: v.as_dict() for k, v in self.choices.items()}, indent=1))

    @classmethod
    def load(cls, path: Path) -> "TuningTable":
        return cls({k: ConvChoice.from_dict(v) for k, v in json.loads(Path(path).read_text()).items()})

    def summary(self) -> str:
        cudnn = sum(c.cudnn_us for c in self.choices.values())
        best = sum(c.best_us for c in self.choices.values())
        n_triton = sum(c.backend == "triton" for c in self.choices.values())
        n_graph = sum(c.backend == "cudnn_graph" for c in self.choices.values())
        return (f"{n_triton}/{len(self.choices)} conv shapes on Triton, {n_graph} on cuDNN graph-API configs; one "
                f"call of each: {cudnn:.0f} us with cuDNN -> {best:.0f} us")


def graph_time_us(make_call: Callable[[int], Callable[[], object]], copies: int = _ROTATE,
                  repeat: int = _REPEAT) -> float:
    """Median device time of one call, replayed in a CUDA graph over `copies` rotating argument sets."""
    calls = [make_call(i) for i in range(copies)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton compilation) outside the capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for c in calls:
                c()
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (repeat * copies))
    return statistics.median(times)


@dataclass
class ConvInputs:
    """Rotating argument sets for timing one shape: inputs, cuDNN weights and biases, the shortcut's input and
    weights (None without one), and the weights as the Triton kernels read them (`weight_matrix`)."""

    xs: list
    ws: list
    bs: list
    x2s: list
    w2s: list
    mats: list


def conv_inputs(s: ConvShape, dtype: torch.dtype = torch.float16, device: "torch.device | None" = None,
                copies: int = _ROTATE) -> ConvInputs:
    dev = torch.device("cuda") if device is None else device
    g = s.groups
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(g * s.n, s.c, s.h, s.w, device=dev, dtype=dtype, generator=gen)
          .contiguous(memory_format=torch.channels_last) for _ in range(copies)]
    ws = [(torch.randn(g, s.cout, s.c, s.kernel, s.kernel, device=dev, dtype=dtype, generator=gen) * 0.02)
          for _ in range(copies)]
    bs = [torch.randn(g, s.cout, device=dev, dtype=dtype, generator=gen) for _ in range(copies)]
    oh, ow = triton_conv.output_size(s.h, s.w, s.kernel, s.stride, s.padding)
    x2s, w2s = [None] * copies, [None] * copies
    if s.shortcut:
        x2s = [torch.randn(g * s.n, s.shortcut, oh, ow, device=dev, dtype=dtype, generator=gen)
               .contiguous(memory_format=torch.channels_last) for _ in range(copies)]
        w2s = [torch.randn(g, s.cout, s.shortcut, 1, 1, device=dev, dtype=dtype, generator=gen) * 0.02
               for _ in range(copies)]
    mats = [triton_conv.weight_matrix(w, w2) for w, w2 in zip(ws, w2s)]
    if g == 1:
        mats, bs = [m[0] for m in mats], [b[0] for b in bs]
    return ConvInputs(xs, ws, bs, x2s, w2s, mats)


def cudnn_call(s: ConvShape, t: ConvInputs, i: int) -> torch.Tensor:
    """Argument set i through cuDNN; with groups one call per group and a concatenation, as the fallback runs
    them, and the shortcut unfused (its own 1x1 convolution, then the add)."""
    outs = []
    for j, (x, b) in enumerate(zip(t.xs[i].chunk(s.groups), t.bs[i].reshape(s.groups, -1))):
        y = F.conv2d(x, t.ws[i][j], b, s.stride, s.padding)
        if s.shortcut:
            y = y + F.conv2d(t.x2s[i].chunk(s.groups)[j], t.w2s[i][j])
        outs.append(y)
    return outs[0] if s.groups == 1 else torch.cat(outs)


def triton_call(s: ConvShape, t: ConvInputs, i: int, cfg: ConvConfig, sum_only: "bool | None" = None
                ) -> torch.Tensor:
    """Argument set i through a Triton config. sum_only None (what is timed) is the convolution as a compiled part
    runs it: kernel + one split-K reduction, or with CNRT_SPLIT_FIXUP the kernel that reduces in place."""
    if sum_only is None:
        sum_only = not triton_conv.SPLIT_FIXUP
    return triton_conv.conv2d_nhwc(t.xs[i], t.mats[i], t.bs[i], s.kernel, s.stride, s.padding, cfg,
                                   groups=s.groups, shortcut=t.x2s[i], sum_only=sum_only)


def graph_api_candidate(s: ConvShape) -> bool:
    """Shapes whose cuDNN graph-API configs are timed: 3x3 convolutions with padding 1 (stride in
    GRAPH_API_STRIDES), channel counts cuDNN's tensor-core engines take. Groups (the twin's pairs) run one call per
    group, side by side on two streams (`cudnn_conv.run_groups`); a fused 1x1 shortcut runs as a cuBLAS GEMM that
    accumulates into the convolution's output. In the step these are the ResNet blocks' convolutions and the
    twin's downsamplers; the 2x2 upsampler convolutions are left out."""
    return (cudnn_conv.available() and s.stride in GRAPH_API_STRIDES and s.kernel == 3 and s.padding == 1
            and s.c % 8 == 0 and s.cout % 8 == 0 and s.shortcut % 8 == 0)


def graph_api_weights(t: ConvInputs) -> list:
    """The rotating weight copies as the graph API reads them (`cudnn_conv.krsc_weights`)."""
    return [cudnn_conv.krsc_weights(w) for w in t.ws]


def graph_api_shortcut_weights(t: ConvInputs) -> list:
    """The rotating 1x1 shortcut weights as `cudnn_conv.run` reads them (`cudnn_conv.shortcut_matrices`; None
    without a shortcut)."""
    return [None if w is None else cudnn_conv.shortcut_matrices(w) for w in t.w2s]


def graph_api_call(s: ConvShape, t: ConvInputs, weights: list, i: int, plan: str,
                   shortcut_weights: "list | None" = None) -> torch.Tensor:
    w2 = None if shortcut_weights is None else shortcut_weights[i]
    if s.groups > 1:
        return cudnn_conv.run_groups(t.xs[i], weights[i], s.padding, plan, s.stride, t.x2s[i], w2)
    return cudnn_conv.run(t.xs[i], weights[i], s.padding, plan, stride=s.stride, shortcut=t.x2s[i],
                          shortcut_weight=w2)


def reference_without_bias(s: ConvShape, t: ConvInputs) -> torch.Tensor:
    """Argument set 0 through torch's convolutions (cuDNN), without the bias, in fp32: what a graph-API config
    (and its shortcut GEMM) must match."""
    outs = []
    for j, x in enumerate(t.xs[0].chunk(s.groups)):
        y = F.conv2d(x, t.ws[0][j], None, s.stride, s.padding).float()
        if s.shortcut:
            y = y + F.conv2d(t.x2s[0].chunk(s.groups)[j], t.w2s[0][j]).float()
        outs.append(y)
    return torch.cat(outs)


def measure_graph_api_plan(call: Callable[[int], Callable[[], torch.Tensor]], ref: torch.Tensor) -> dict:
    """One cuDNN graph-API engine config, call(i) running it on argument set i: run twice on set 0, then timed
    (`graph_time_us`) only if the two runs gave the same bytes and the result is within MAX_RELATIVE_ERROR of ref.
    -> {"error": why} when it cannot build or run here, else {"rel_err", "repeatable", "us" (nan: not timed)}."""
    try:
        first, again = call(0)(), call(0)()
        err, same = relative_error(first, ref), torch.equal(first, again)
    except Exception as e:  # noqa: BLE001  (a config this GPU cannot build or run)
        return {"error": f"{type(e).__name__}: {str(e)[:100]}"}
    us = graph_time_us(call) if same and err < MAX_RELATIVE_ERROR else float("nan")
    return {"rel_err": err, "repeatable": same, "us": us}


def tune_graph_api(s: ConvShape, t: ConvInputs, best: "ConvChoice", max_plans: int = GRAPH_API_PLANS
                   ) -> "ConvChoice":
    """`best`, or a faster cuDNN graph-API engine config: each of the first max_plans the heuristics rank is
    built, checked against torch's cuDNN call (without the bias: these configs leave it to the consumer) and for
    bitwise repeatability (the same call twice must give the same bytes), and timed (`measure_graph_api_plan`)."""
    weights, shortcut_weights = graph_api_weights(t), graph_api_shortcut_weights(t)
    ref = reference_without_bias(s, t)
    margin = SHORTCUT_MARGIN_US if s.shortcut else 0.0
    one = (t.xs[0][:t.xs[0].shape[0] // s.groups], weights[0] if s.groups == 1 else weights[0][0])
    names = cudnn_conv.plan_names(*one, s.padding, s.stride)[:max_plans]
    wrong = 0
    for plan in names:
        result = measure_graph_api_plan(
            lambda i, plan=plan: lambda: graph_api_call(s, t, weights, i, plan, shortcut_weights), ref)
        if "error" in result:
            print(f"[conv-tuning] skipped cuDNN {plan} for {s.key}: {result['error']}", file=sys.stderr)
        elif not result["repeatable"]:
            print(f"[conv-tuning] skipped cuDNN {plan} for {s.key}: not repeatable", file=sys.stderr)
        elif not result["rel_err"] < MAX_RELATIVE_ERROR:
            wrong += 1
        elif result["us"] + margin < best.best_us + (margin if best.backend == "cudnn_graph" else 0.0):
            best = ConvChoice("cudnn_graph", None, best.cudnn_us, result["us"], plan)
    if wrong:
        print(f"[conv-tuning] {s.key}: {wrong} of {len(names)} cuDNN graph-API configs skipped (relative error over "
              f"{MAX_RELATIVE_ERROR:g} against torch's cuDNN call)", file=sys.stderr)
    return best


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.float()
    return ((got - ref).norm() / ref.norm()).item()


@torch.no_grad()
def tune_shape(shape: ConvShape, dtype: torch.dtype = torch.float16, check: bool = True) -> ConvChoice:
    s = shape
    t = conv_inputs(s, dtype)
    cudnn_us = graph_time_us(lambda i: lambda: cudnn_call(s, t, i))
    best = ConvChoice("cudnn", None, cudnn_us, cudnn_us)
    if not triton_conv.available():
        return best
    ref = cudnn_call(s, t, 0).float() if check else None
    oh, ow = triton_conv.output_size(s.h, s.w, s.kernel, s.stride, s.padding)
    candidates = triton_conv.candidate_configs(s.groups * s.n * oh * ow, s.cout, s.c, s.kernel, s.shortcut)
    if s.stride == 1:
        candidates += triton_conv.tma_candidate_configs(s.n, oh, ow, s.cout, s.c, s.kernel, s.shortcut, s.groups)
    for cfg in candidates:
        if ref is not None:
            err = relative_error(triton_call(s, t, 0, cfg, sum_only=False), ref)
            if not err < MAX_RELATIVE_ERROR:  # a miscompiled config is never chosen
                print(f"[conv-tuning] skipped {cfg} for {s.key}: relative error {err:.2e} against cuDNN",
                      file=sys.stderr)
                continue
        us = graph_time_us(lambda i, cfg=cfg: lambda: triton_call(s, t, i, cfg))
        if us < best.best_us:
            best = ConvChoice("triton", cfg, cudnn_us, us)
    if graph_api_candidate(s):
        best = tune_graph_api(s, t, best)
    return best


@torch.no_grad()
def add_graph_api_choices(table: TuningTable, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                          keys: "set[str] | None" = None) -> TuningTable:
    """A copy of a table tuned without the cuDNN graph API (TUNING_VERSION 3) with its graph-API configs timed for
    every shape `graph_api_candidate` takes (of `keys`, if given), as `tune_shape` times them: what a full re-tune
    would record, since the other candidates' search is unchanged."""
    out = TuningTable(dict(table.choices))
    for key, choice in sorted(table.choices.items()):
        s = ConvShape.from_key(key)
        if not graph_api_candidate(s) or (keys is not None and key not in keys):
            continue
        best = tune_graph_api(s, conv_inputs(s), choice)
        out.choices[key] = best
        log(f"[conv-tuning] {key}: {choice.backend} {choice.best_us:.1f} us -> {best.backend} {best.best_us:.1f} us"
            f"{' ' + best.plan if best.plan else ''}")
    return out


def tune_all(shapes: list[ConvShape], log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
             ) -> TuningTable:
    table = TuningTable()
    start = time.perf_counter()
    for i, shape in enumerate(sorted(set(shapes), key=lambda s: s.key)):
        choice = tune_shape(shape)
        table.choices[shape.key] = choice
        cfg = f" {choice.plan}" if choice.plan else ("" if choice.config is None else f" {choice.config}")
        log(f"[conv-tuning] {i + 1}: {shape.key}: cuDNN {choice.cudnn_us:.1f} us, best {choice.backend} "
            f"{choice.best_us:.1f} us{cfg}")
    log(f"[conv-tuning] {table.summary()} ({time.perf_counter() - start:.0f} s)")
    return table

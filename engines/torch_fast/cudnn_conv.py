"""kxk convolutions (stride 1 or 2) through cuDNN's graph API (the cudnn-frontend package), on a named engine config.

Why: torch calls cuDNN through its legacy convolution API, which takes the heuristics' first engine config. On the
H200 that config is among the slowest the graph API offers for the step's 32x48 and 16x24 convolutions: for
2x960x32x48 -> 320 it ran 53.4 us, while another config of the same engine ran 37.2 us and our tuned Triton kernel
46.7 (`python3 -m bench.cudnn_frontend_conv`, bench/NOTES.md, session 15). So the conv tuner can also time the
graph API's configs, and the step runs the winner by name: `conv2d(x, weight, padding, plan)`.

The graph of a shape is built on first use (outside CUDA-graph capture: the runner warms every part up first) and
kept; a call then only binds pointers and launches. Images and outputs are channels_last, weights (Cout, Cin, k,
k) channels_last (cuDNN's KRSC), fp16 in and out, fp32 accumulation. No bias: `with_bias` adds it after (under
torch.compile it fuses into the next kernel, which reads the output anyway).

`run_groups` (what `conv2d` calls for (G, Cout, Cin, k, k) weights) runs the twin encoder's pairs: G convolutions
with their own weights over G equal slices of the batch, as `triton_conv`'s groups. One call per group, group 0 on
the current stream and the others on a side stream that forks from and joins it, so that the halves run side by
side (also inside a captured graph). The H100 A/Bs of both uses are in bench/NOTES.md, fifteenth session.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import torch

from engines.torch_fast import triton_conv
from profiles.config import env_flag

try:
    import cudnn  # nvidia-cudnn-frontend
except (ImportError, OSError):  # not installed, or no libcudnn it can load
    cudnn = None

ENABLED = env_flag("CNRT_CUDNN_FRONTEND", True)  # 0: the tuner never offers these configs (A/B measurements)
_lock = threading.RLock()
_handles: dict = {}
_graphs: dict = {}


def available() -> bool:
    """Whether the graph API can be tried here: the package, a CUDA device, not switched off."""
    return ENABLED and cudnn is not None and torch.cuda.is_available()


def version() -> str:
    """cudnn-frontend and cuDNN backend versions, for the tuning table's key ('' without the package)."""
    if cudnn is None:
        return ""
    return f"{getattr(cudnn, '__version__', '?')}/{cudnn.backend_version()}"


def _handle(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _handles:
            with torch.cuda.device(index):
                _handles[index] = cudnn.create_handle()
        return _handles[index]


def _heuristics() -> list:
    return [cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK]


@dataclass
class _Graph:
    """One shape's graph: its tensors, the engine configs the heuristics proposed, and the config built."""

    graph: object
    x: object
    w: object
    y: object
    names: list
    built: "int | None" = None
    workspace: int = 0


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), tuple(t.stride())


def _empty_output(x: torch.Tensor, weight: torch.Tensor, padding: int, stride: int = 1) -> torch.Tensor:
    """The channels_last output of a convolution of x by (Cout, Cin, k, k) weights."""
    n, _, h, w = x.shape
    oh, ow = triton_conv.output_size(h, w, weight.shape[-1], stride, padding)
    return torch.empty(n, weight.shape[0], oh, ow, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)


def with_bias(y: torch.Tensor, bias: torch.Tensor, groups: int = 1,
              residual: "torch.Tensor | None" = None) -> torch.Tensor:
    """y + bias (+ residual), summed in fp32 and rounded once, as the Triton kernels' epilogue adds them: what a
    graph-API convolution (no bias of its own) is followed by. bias (C,) or (groups, C), one row per slice of the
    batch; under torch.compile this fuses into the next kernel."""
    n, c, h, w = y.shape
    out = y.float().view(groups, n // groups, c, h, w) + bias.float().view(-1, 1, c, 1, 1)
    if residual is not None:
        out = out + residual.float().view(groups, n // groups, c, h, w)
    return out.view(n, c, h, w).to(y.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1] or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"need x (N, C, H, W) and a square weight (Cout, C, k, k); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if x.dtype != torch.float16 or weight.dtype != torch.float16:
        raise ValueError(f"fp16 only, got {x.dtype} and {weight.dtype}")
    for name, t in (("x", x), ("weight", weight)):
        if not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"{name} must be channels_last")


def _graph_for(x: torch.Tensor, weight: torch.Tensor, padding: int, stride: int = 1) -> _Graph:
    """The graph of this shape (built once per shape, layout and device), with its engine configs listed."""
    key = (x.device.index, _layout(x), _layout(weight), padding, stride)
    with _lock:
        found = _graphs.get(key)
    if found is not None:
        return found
    handle = _handle(x.device)
    g = cudnn.pygraph(io_data_type=cudnn.data_type.HALF, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    tx = g.tensor(name="X", dim=list(x.shape), stride=list(x.stride()), data_type=cudnn.data_type.HALF)
    tw = g.tensor(name="W", dim=list(weight.shape), stride=list(weight.stride()), data_type=cudnn.data_type.HALF)
    ty = g.conv_fprop(image=tx, weight=tw, padding=[padding, padding], stride=[stride, stride], dilation=[1, 1],
                      compute_data_type=cudnn.data_type.FLOAT, name="conv")
    y = _empty_output(x, weight, padding, stride)
    ty.set_output(True).set_data_type(cudnn.data_type.HALF).set_dim(list(y.shape)).set_stride(list(y.stride()))
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans(_heuristics())
    g.check_support()
    names = [g.get_plan_name_at_index(i) for i in range(g.get_execution_plan_count())]
    entry = _Graph(g, tx, tw, ty, names)
    with _lock:
        return _graphs.setdefault(key, entry)


def plan_names(x: torch.Tensor, weight: torch.Tensor, padding: int, stride: int = 1) -> list[str]:
    """The engine configs cuDNN's heuristics (modes A, B, then the fallback list) propose for this shape, best
    ranked first. Not every one builds on every GPU."""
    _check(x, weight)
    return list(_graph_for(x, weight, padding, stride).names)


def _select(entry: _Graph, plan: str) -> None:
    if plan not in entry.names:
        raise ValueError(f"cuDNN offers no engine config {plan!r} for this convolution (the tuning table was made "
                         f"with another cuDNN?); it offers {len(entry.names)}, e.g. {entry.names[:3]}")
    index = entry.names.index(plan)
    if entry.built != index:
        entry.graph.build_plan_at_index(index)
        entry.workspace = entry.graph.get_workspace_size_plan_at_index(index)
        entry.built = index


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A channels_last (N, C, H, W) map as its (N*H*W, C) rows (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def run(x: torch.Tensor, weight: torch.Tensor, padding: int, plan: str,
        out: "torch.Tensor | None" = None, stride: int = 1, shortcut: "torch.Tensor | None" = None,
        shortcut_weight: "torch.Tensor | None" = None) -> torch.Tensor:
    """conv2d(x, weight, stride, padding) on engine config `plan`, on the current stream (capturable).
    shortcut (N, Cs, OH, OW) channels_last with shortcut_weight (Cs, Cout): plus that 1x1 convolution, a cuBLAS
    GEMM accumulating into the output (ResNet conv2 + its 1x1 shortcut)."""
    _check(x, weight)
    entry = _graph_for(x, weight, padding, stride)
    with _lock:
        _select(entry, plan)
        workspace = torch.empty(max(entry.workspace, 1), device=x.device, dtype=torch.uint8)
        y = _empty_output(x, weight, padding, stride) if out is None else out
        handle = _handle(x.device)
        cudnn.set_stream(handle, torch.cuda.current_stream(x.device).cuda_stream)
        entry.graph.execute_plan_at_index({entry.x: x, entry.w: weight, entry.y: y}, workspace, entry.built,
                                          handle=handle)
    if shortcut is not None:
        _rows(y).addmm_(_rows(shortcut), shortcut_weight)
    return y


def stacked_krsc(weights: torch.Tensor) -> torch.Tensor:
    """(G, Cout, Cin, k, k) weights with each group's (Cout, Cin, k, k) channels_last (KRSC), in one tensor."""
    return weights.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def krsc_weights(weights: torch.Tensor) -> torch.Tensor:
    """(G, Cout, Cin, k, k) weights as `run` (G = 1: one (Cout, Cin, k, k) channels_last) or `run_groups`
    (`stacked_krsc`) reads them."""
    return weights[0].contiguous(memory_format=torch.channels_last) if weights.shape[0] == 1 else stacked_krsc(weights)


def shortcut_matrices(weights: torch.Tensor) -> torch.Tensor:
    """(G, Cout, Cs, 1, 1) 1x1 shortcut weights as `run` ((Cs, Cout) for G = 1) or `run_groups` ((G, Cs, Cout))
    reads them."""
    matrices = weights[..., 0, 0].transpose(1, 2).contiguous()
    return matrices[0] if weights.shape[0] == 1 else matrices


_side_streams: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _side_streams:
            _side_streams[index] = torch.cuda.Stream(device=index)
        return _side_streams[index]


def run_groups(x: torch.Tensor, weights: torch.Tensor, padding: int, plan: str, stride: int = 1,
               shortcut: "torch.Tensor | None" = None, shortcut_weights: "torch.Tensor | None" = None
               ) -> torch.Tensor:
    """G convolutions in one call: images [g*N/G, (g+1)*N/G) with weights[g] (G, Cout, Cin, k, k), each group's
    channels_last (`stacked_krsc`), all on engine config `plan` (tuned for one group's shape). Group 0 runs on the
    current stream, the rest on a side stream forked from it and joined back before returning. shortcut and
    shortcut_weights (G, Cs, Cout): each group's 1x1 shortcut as in `run`."""
    groups = weights.shape[0]
    if weights.dim() != 5 or x.shape[0] % groups:
        raise ValueError(f"need weights (G, Cout, Cin, k, k) and N divisible by G; got {tuple(weights.shape)}, "
                         f"N={x.shape[0]}")
    n = x.shape[0] // groups
    y = _empty_output(x, weights[0], padding, stride)
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    side.wait_stream(main)
    for g in range(groups):
        with torch.cuda.stream(main if g == 0 else side):
            run(x[g * n:(g + 1) * n], weights[g], padding, plan, out=y[g * n:(g + 1) * n], stride=stride,
                shortcut=None if shortcut is None else shortcut[g * n:(g + 1) * n],
                shortcut_weight=None if shortcut is None else shortcut_weights[g])
    main.wait_stream(side)
    return y


if cudnn is not None:

    # Optional[...], not 'X | None': custom_op's schema inference does not read PEP 604 unions
    @torch.library.custom_op("cnrt::cudnn_conv2d_groups", mutates_args=(), device_types="cuda")
    def _conv_groups_op(x: torch.Tensor, weights: torch.Tensor, padding: int, plan: str, stride: int = 1,
                        shortcut: Optional[torch.Tensor] = None, shortcut_weights: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
        """`run_groups` as an operator torch.compile keeps whole."""
        if shortcut is not None:
            shortcut = shortcut.contiguous(memory_format=torch.channels_last)
        return run_groups(x.contiguous(memory_format=torch.channels_last), weights, padding, plan, stride,
                          shortcut, shortcut_weights)

    @_conv_groups_op.register_fake
    def _(x, weights, padding, plan, stride=1, shortcut=None, shortcut_weights=None):
        return _empty_output(x, weights[0], padding, stride)

    @torch.library.custom_op("cnrt::cudnn_conv2d", mutates_args=(), device_types="cuda")
    def _conv_op(x: torch.Tensor, weight: torch.Tensor, padding: int, plan: str, stride: int = 1,
                 shortcut: Optional[torch.Tensor] = None, shortcut_weight: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """`run` as an operator torch.compile keeps whole (one extern call in the compiled part)."""
        if shortcut is not None:
            shortcut = shortcut.contiguous(memory_format=torch.channels_last)
        return run(x.contiguous(memory_format=torch.channels_last),
                   weight.contiguous(memory_format=torch.channels_last), padding, plan, stride=stride,
                   shortcut=shortcut, shortcut_weight=shortcut_weight)

    @_conv_op.register_fake
    def _(x, weight, padding, plan, stride=1, shortcut=None, shortcut_weight=None):
        return _empty_output(x, weight, padding, stride)


def conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int, plan: str, stride: int = 1,
           shortcut: "torch.Tensor | None" = None, shortcut_weight: "torch.Tensor | None" = None) -> torch.Tensor:
    """conv2d(x, weight, stride, padding), no bias, through cuDNN engine config `plan` (a name `plan_names` gave),
    plus shortcut's 1x1 convolution by shortcut_weight (Cs, Cout) if given.
    weight (G, Cout, Cin, k, k) (`stacked_krsc`), shortcut_weight (G, Cs, Cout): G convolutions over G slices of
    the batch (`run_groups`)."""
    if cudnn is None:
        raise RuntimeError("cuDNN graph-API convolutions need the nvidia-cudnn-frontend package")
    if weight.dim() == 5:
        return torch.ops.cnrt.cudnn_conv2d_groups(x, weight, padding, plan, stride, shortcut, shortcut_weight)
    return torch.ops.cnrt.cudnn_conv2d(x, weight, padding, plan, stride, shortcut, shortcut_weight)

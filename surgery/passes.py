"""Graph surgery as small named passes over an onnx-graphsurgeon graph.

Every pass has the signature `pass_(graph: gs.Graph) -> None` and edits the graph in place; passes that need
arguments are built by a factory that returns such a function (with a readable `__name__` for the log).
`apply_passes` runs one ordered list, logs the node count after each pass and always ends with cleanup + toposort,
so a pass may leave dead nodes or any node order behind it.

Generic passes live here; the fp16 normalisation upcast is in surgery/precision.py and the fused-step glue in
surgery/fuse.py.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from profiles.errors import ControlNetRTError
from surgery.layout import log

Pass = Callable[[gs.Graph], None]

# Folding may not create constants bigger than this: an Expand/Tile of a small constant into a large one would
# trade a cheap runtime op for weight memory and file size.
FOLD_SIZE_THRESHOLD = 64 << 20
# Initializers above this size are given to shape inference as typed graph inputs instead of values, so a
# multi-GB graph never has to be serialised into one (2 GB-limited) protobuf just to learn its tensor types.
_INFERENCE_INLINE_LIMIT = 4096


def named(name: str, fn: Pass) -> Pass:
    fn.__name__ = name
    return fn


def apply_passes(graph: gs.Graph, passes: Sequence[Pass], label: str) -> gs.Graph:
    log(f"[surgery] {label}: {len(graph.nodes)} nodes before surgery")
    for pass_ in passes:
        pass_(graph)
        log(f"[surgery] {label}: {pass_.__name__:<28} -> {len(graph.nodes)} nodes")
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    log(f"[surgery] {label}: {'cleanup + toposort':<28} -> {len(graph.nodes)} nodes")
    return graph


# --- passes -------------------------------------------------------------------------------------------------------

def remove_identity(graph: gs.Graph) -> None:
    """Bypass Identity nodes (the TorchScript exporter emits one per re-used constant, e.g. GroupNorm's ones)."""
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        _bypass(graph, node)


def remove_noop_casts(graph: gs.Graph) -> None:
    """Bypass Casts to the type their input already has (fp32 exports keep every `.to(sample.dtype)`)."""
    types = infer_tensor_types(graph)
    for node in [n for n in graph.nodes if n.op == "Cast"]:
        src = types.get(node.inputs[0].name)
        if src is not None and src == onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]):
            _bypass(graph, node)


def remove_unit_arithmetic(graph: gs.Graph) -> None:
    """Bypass x * 1 and x / 1 with a constant 1 that cannot broadcast x to a bigger shape (exact in IEEE
    arithmetic; diffusers divides every ResNet block output by output_scale_factor = 1)."""
    info = infer_tensor_info(graph)
    for node in [n for n in graph.nodes if n.op in ("Mul", "Div")]:
        data_index = 0
        one = node.inputs[1]
        if node.op == "Mul" and isinstance(node.inputs[0], gs.Constant):
            data_index, one = 1, node.inputs[0]
        data = node.inputs[data_index]
        if not isinstance(one, gs.Constant) or isinstance(data, gs.Constant) or one._values.nbytes > 64:
            continue
        data_info, one_values = info.get(data.name), np.asarray(one.values)
        if (data_info is None or data_info[1] is None or one_values.size != 1 or np.any(one_values != 1)
                or one_values.ndim > len(data_info[1]) or one_values.dtype != data_info[0]):
            continue
        _bypass(graph, node, data_index)


def fold_constants(graph: gs.Graph) -> None:
    """Evaluate everything computable from constants (with onnxruntime), shapes included: with static profile
    shapes every Shape -> Gather -> Concat -> Reshape chain becomes a constant."""
    import onnxruntime

    # ORT's own optimizer, inside the folding sessions, warns about every fp16 op it cannot pre-evaluate (the
    # session still computes it), and gs warns about every piece it cannot fold (it simply stays computed at
    # runtime): noise here, so both are quieted for the duration of the pass.
    onnxruntime.set_default_logger_severity(3)
    gs_severity, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.ERROR
    try:  # one onnxruntime session for everything foldable: fast
        graph.fold_constants(fold_shapes=True, error_ok=False, size_threshold=FOLD_SIZE_THRESHOLD)
    except Exception:  # some node has no CPU kernel (e.g. in fp16): fold piece by piece, skipping what fails
        graph.fold_constants(fold_shapes=True, partitioning="basic", error_ok=True,
                             size_threshold=FOLD_SIZE_THRESHOLD)
    finally:
        onnxruntime.set_default_logger_severity(2)  # ORT's default (warning); it has no getter
        G_LOGGER.severity = gs_severity
    graph.cleanup(remove_unused_graph_inputs=False)


def infer_shapes(graph: gs.Graph) -> None:
    """Record every intermediate tensor's static shape and type (onnx shape inference), so fold_constants can
    turn Shape ops into constants. The exporter writes no value_info, so without this nothing shape-derived folds."""
    info = infer_tensor_info(graph)
    boundary = set(id(t) for t in list(graph.inputs) + list(graph.outputs))
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and id(tensor) not in boundary and name in info:
            tensor.dtype, tensor.shape = info[name]


def remove_dead_nodes(graph: gs.Graph) -> None:
    """Drop nodes and constants that no graph output depends on (graph inputs stay: they are the contract)."""
    graph.cleanup(remove_unused_graph_inputs=False)


def clear_intermediate_shapes(graph: gs.Graph) -> None:
    """Forget recorded shapes/dtypes of intermediate tensors: surgery (merging, casts) makes them stale, and ORT,
    onnx shape inference and TensorRT all re-derive them from the static graph inputs."""
    boundary = set(id(t) for t in list(graph.inputs) + list(graph.outputs))
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in boundary:
            tensor.shape = None
            tensor.dtype = None


def prefix_names(prefix: str) -> Pass:
    """Prefix every node and tensor name (graph I/O included), so two exported graphs can share one namespace."""

    def pass_(graph: gs.Graph) -> None:
        def join(name: str) -> str:  # exporter names start with "/": "unet/" + "/net/..." -> "unet/net/..."
            return prefix + name[1:] if prefix.endswith("/") and name.startswith("/") else prefix + name

        for tensor in graph.tensors().values():
            if tensor.name:  # "" marks an omitted optional input
                tensor.name = join(tensor.name)
        for i, node in enumerate(graph.nodes):
            node.name = join(node.name or f"{node.op}_{i}")

    return named(f"prefix_names({prefix!r})", pass_)


def rename_io(mapping: Mapping[str, str]) -> Pass:
    """Rename graph inputs/outputs (old name -> new name); a missing name is a bug in the caller's wiring."""

    def pass_(graph: gs.Graph) -> None:
        io = {t.name: t for t in list(graph.inputs) + list(graph.outputs)}
        missing = sorted(set(mapping) - set(io))
        if missing:
            raise ControlNetRTError(f"rename_io: graph has no input/output named {missing} (graph I/O: {sorted(io)})")
        for old, new in mapping.items():
            io[old].name = new

    return named(f"rename_io({len(mapping)} names)", pass_)


def merge_subgraph(part: gs.Graph, prefix: str, connect: Mapping[str, str],
                   outputs: "Mapping[str, str] | None" = None) -> Pass:
    """Absorb `part` into the graph: prefix its names, wire each of its inputs to an existing tensor of the graph
    (`connect`: part input name -> graph tensor name) and optionally expose part outputs as graph outputs
    (`outputs`: part output name -> graph output name). Other part outputs stay reachable as prefix + name.
    Every part input must be connected, so nothing is silently left as a dangling graph input."""
    outputs = dict(outputs or {})

    def pass_(graph: gs.Graph) -> None:
        part_inputs = {t.name: t for t in part.inputs}
        part_outputs = {t.name: t for t in part.outputs}
        unconnected = sorted(set(part_inputs) - set(connect))
        unknown = sorted((set(connect) - set(part_inputs)) | (set(outputs) - set(part_outputs)))
        if unconnected or unknown:
            raise ControlNetRTError(f"merge_subgraph({prefix!r}): unconnected part inputs {unconnected}, "
                                    f"unknown names {unknown}")
        tensors = graph.tensors()
        prefix_names(prefix)(part)
        for name, target_name in connect.items():
            if target_name not in tensors:
                raise ControlNetRTError(f"merge_subgraph({prefix!r}): graph has no tensor {target_name!r}")
            _replace_uses(part_inputs[name], tensors[target_name])
        graph.nodes.extend(part.nodes)
        for name, new_name in outputs.items():
            tensor = part_outputs[name]
            tensor.name = new_name
            graph.outputs.append(tensor)
        part.nodes.clear()  # the nodes now belong to `graph`

    return named(f"merge_subgraph({prefix!r})", pass_)


def _bypass(graph: gs.Graph, node: gs.Node, keep: int = 0) -> None:
    """Remove a node whose output equals its input `keep`: consumers read that input instead. If the output is a
    graph output (whose name is the contract), the input's producer writes the output tensor instead; a node
    between two graph I/O tensors (or a constant and a graph output) stays."""
    src, dst = node.inputs[keep], node.outputs[0]
    if any(t is dst for t in graph.outputs):
        if isinstance(src, gs.Constant) or len(src.inputs) != 1 or any(t is src for t in graph.inputs + graph.outputs):
            return
        producer = src.inputs[0]
        node.inputs.clear()  # so that re-pointing src's readers below skips this node
        _replace_uses(src, dst)
        producer.outputs[[i for i, t in enumerate(producer.outputs) if t is src][0]] = dst
    else:
        _replace_uses(dst, src)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every node that reads `old` reads `new` instead (the 'wire an output to an input' step of a merge)."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def require_io(names_in: Sequence[str], names_out: Sequence[str]) -> Pass:
    """Fail unless the graph's inputs and outputs are exactly these names, in this order (the backend contract)."""

    def pass_(graph: gs.Graph) -> None:
        got_in, got_out = [t.name for t in graph.inputs], [t.name for t in graph.outputs]
        if got_in != list(names_in) or got_out != list(names_out):
            raise ControlNetRTError(f"graph {graph.name!r} has I/O {got_in} -> {got_out}, the contract says "
                                    f"{list(names_in)} -> {list(names_out)}: surgery bug, please report it")

    return named("require_io", pass_)


# --- helpers shared by passes -------------------------------------------------------------------------------------

def infer_tensor_info(graph: gs.Graph) -> dict[str, tuple[np.dtype, "tuple | None"]]:
    """(element type, static shape or None) of every tensor, from onnx shape inference on a weight-less copy."""
    light = graph.copy()
    for tensor in list(light.tensors().values()):
        # _values: a LazyValues knows its size without loading the weights.
        if isinstance(tensor, gs.Constant) and tensor._values.nbytes > _INFERENCE_INLINE_LIMIT:
            stand_in = gs.Variable(tensor.name, dtype=tensor.export_dtype, shape=list(tensor.shape))
            _replace_uses(tensor, stand_in)
            light.inputs.append(stand_in)
    model = onnx.shape_inference.infer_shapes(gs.export_onnx(light, do_type_check=False), strict_mode=False,
                                              data_prop=True)
    info = {}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        ttype = value.type.tensor_type
        if not ttype.elem_type:
            continue
        shape = None
        if ttype.HasField("shape") and all(d.HasField("dim_value") for d in ttype.shape.dim):
            shape = tuple(d.dim_value for d in ttype.shape.dim)
        info[value.name] = (onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type), shape)
    for init in model.graph.initializer:
        info[init.name] = (onnx.helper.tensor_dtype_to_np_dtype(init.data_type), tuple(init.dims))
    for node in model.graph.node:  # Constant nodes' outputs are typed by their attribute, not value_info
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = node.attribute[0].t
            info.setdefault(node.output[0], (onnx.helper.tensor_dtype_to_np_dtype(t.data_type), tuple(t.dims)))
    return info


def infer_tensor_types(graph: gs.Graph) -> dict[str, np.dtype]:
    return {name: dtype for name, (dtype, _) in infer_tensor_info(graph).items()}

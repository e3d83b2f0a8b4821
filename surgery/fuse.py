"""Merge the exported ControlNet, UNet and CFG+DDIM graphs into the one fused-step graph.

The result has exactly the inputs and outputs of `models.step.step_io` and computes what
`models.step.FusedDenoiseStep` computes. The glue that FusedDenoiseStep writes in torch is written here as ONNX
nodes around the three exported graphs:

    x ──Concat[x, x]──Cast──────────────────────────┬─> controlnet/sample, unet/sample
    timestep ──Expand(2B)───────────────────────────┼─> controlnet/timesteps, unet/timesteps
    context ──Cast──────────────────────────────────┼─> controlnet/context, unet/context
    hint_features ──Concat[h, h]──Cast──────────────┴─> controlnet/hint_features
    control_scales (2, 13) ──Cast──Reshape(2,1,13,1,1)──Expand(2,B,..)──Reshape(2B,13,1,1)──Split──> s_i
    controlnet/residual_i * s_i ──> unet/control_i          (row 0 scales the cond half, row 1 the uncond half)
    unet/eps, x, guidance_scale, coeffs ──> update/ ──> x_prev

The Casts exist only in fp16 (the networks' dtype); in fp32 the glue tensors are the inputs themselves.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from models.step import STEP_INPUTS, STEP_OUTPUTS, TensorSpec
from profiles.config import NUM_CONTROLS, Precision
from surgery.export import CONTROL_NAMES, RESIDUAL_NAMES
from surgery.layout import OPSET
from surgery.passes import Pass, merge_subgraph, named

_ONNX_DTYPE = {Precision.FP32: onnx.TensorProto.FLOAT, Precision.FP16: onnx.TensorProto.FLOAT16}
_NP_DTYPE = {Precision.FP32: np.float32, Precision.FP16: np.float16}


def glue_graph(io: "Mapping[str, TensorSpec]", precision: Precision, opset: int = OPSET
               ) -> tuple[gs.Graph, dict[str, str]]:
    """The fused step's boundary inputs and the glue before the networks, at the parts' opset.

    Returns the graph (no outputs yet) and the names of the glue tensors the networks read: sample, timesteps,
    context, hint_features, and scale_0..scale_12.
    """
    precision = Precision(precision)
    inputs = {name: gs.Variable(name, dtype=np.float32, shape=io[name].shape) for name in STEP_INPUTS}
    graph = gs.Graph(inputs=list(inputs.values()), outputs=[], opset=opset, name="fused_step")
    b = io["x"].shape[0]

    def node(op, name, ins, outs, attrs=None, dtype=None):
        outs = [gs.Variable(f"step/{o}", dtype=dtype) for o in outs]
        graph.nodes.append(gs.Node(op, name=f"step/{name}", inputs=list(ins), outputs=outs, attrs=attrs or {}))
        return outs

    def const(name, values):
        return gs.Constant(f"step/{name}", np.asarray(values, dtype=np.int64))

    def to_network_dtype(tensor, name):
        if precision is Precision.FP32:
            return tensor
        return node("Cast", f"cast_{name}", [tensor], [name], {"to": _ONNX_DTYPE[precision]},
                    _NP_DTYPE[precision])[0]

    x2 = node("Concat", "concat_x", [inputs["x"], inputs["x"]], ["x_cfg"], {"axis": 0}, np.float32)[0]
    hint2 = node("Concat", "concat_hint", [inputs["hint_features"]] * 2, ["hint_cfg"], {"axis": 0}, np.float32)[0]
    timesteps = node("Expand", "expand_timestep", [inputs["timestep"], const("cfg_batch", [2 * b])],
                     ["timesteps"], dtype=np.float32)[0]
    wires = {
        "sample": to_network_dtype(x2, "sample"),
        "timesteps": timesteps,
        "context": to_network_dtype(inputs["context"], "context"),
        "hint_features": to_network_dtype(hint2, "hint_features"),
    }
    # repeat_interleave(B) of the (2, 13) table as Reshape/Expand/Reshape, then one (2B, 1, 1, 1) column per residual.
    dt = _NP_DTYPE[precision]
    scales = to_network_dtype(inputs["control_scales"], "control_scales")
    scales = node("Reshape", "scales_rows", [scales, const("rows_shape", [2, 1, NUM_CONTROLS, 1, 1])],
                  ["scales_rows"], dtype=dt)[0]
    scales = node("Expand", "scales_expand", [scales, const("expand_shape", [2, b, NUM_CONTROLS, 1, 1])],
                  ["scales_expanded"], dtype=dt)[0]
    scales = node("Reshape", "scales_batch", [scales, const("batch_shape", [2 * b, NUM_CONTROLS, 1, 1])],
                  ["scales_batch"], dtype=dt)[0]
    # Explicit split sizes: valid from opset 13 on (opset 18 would otherwise need the num_outputs attribute).
    columns = node("Split", "scales_split", [scales, const("split_sizes", [1] * NUM_CONTROLS)],
                   [f"scale_{i}" for i in range(NUM_CONTROLS)], {"axis": 1}, dt)
    wires.update({f"scale_{i}": column for i, column in enumerate(columns)})
    return graph, {role: tensor.name for role, tensor in wires.items()}


def scale_controls(wires: Mapping[str, str], prefix: str = "controlnet/") -> Pass:
    """control_i = residual_i * scale_i, named step/control_i (runs after the ControlNet is merged)."""

    def pass_(graph: gs.Graph) -> None:
        tensors = graph.tensors()
        for i in range(NUM_CONTROLS):
            residual, scale = tensors[prefix + RESIDUAL_NAMES[i]], tensors[wires[f"scale_{i}"]]
            out = gs.Variable(f"step/{CONTROL_NAMES[i]}")
            graph.nodes.append(gs.Node("Mul", name=f"step/scale_{CONTROL_NAMES[i]}", inputs=[residual, scale],
                                       outputs=[out]))

    return named("scale_controls", pass_)


def fused_step_passes(parts: Mapping[str, gs.Graph], wires: Mapping[str, str]) -> list[Pass]:
    """The merges that turn the glue graph into the whole step, in order (generic cleanup passes follow)."""
    shared = {"sample": wires["sample"], "timesteps": wires["timesteps"], "context": wires["context"]}
    return [
        merge_subgraph(parts["controlnet"], "controlnet/", {**shared, "hint_features": wires["hint_features"]}),
        scale_controls(wires),
        merge_subgraph(parts["unet"], "unet/", {**shared, **{c: f"step/{c}" for c in CONTROL_NAMES}}),
        merge_subgraph(parts["update"], "update/",
                       {"x": "x", "eps": "unet/eps", "guidance_scale": "guidance_scale", "coeffs": "coeffs"},
                       outputs={"x_prev": STEP_OUTPUTS[0]}),
    ]

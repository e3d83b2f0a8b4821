"""fp16 graphs that a strongly typed TensorRT (10+) can build as written: where fp32 stays, and why.

TensorRT 10 in strongly typed mode runs every layer in the precision the ONNX graph gives it; it no longer picks
fp32 for a risky layer by itself. So the fp16 ONNX files must spell out every place that has to stay fp32:

1. Boundaries (`models.step.network_io`) are float32. The exported wrappers cast at their edges (TextEncoder,
   HintEncoder and LatentDecoder in models/step.py); in the fused step the glue (surgery/fuse.py) casts x, context,
   hint_features and control_scales to fp16 after the float32 inputs, and GuidedDDIMUpdate casts eps back to
   float32, so CFG and the DDIM update run in fp32: x is carried over 20 steps and guidance scale 9 amplifies
   (e_c - e_u), both of which would accumulate fp16 rounding.
2. The timestep embedding's sinusoid is computed in fp32 (diffusers' Timesteps on the float32 timestep) and cast to
   fp16 only before the time MLP; 951 * freq in fp16 would lose the phase.
3. Normalisation and softmax (`upcast_to_fp32`, run on every fp16 graph): each InstanceNormalization (GroupNorm is
   exported at opset 17 as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add), LayerNormalization and
   Softmax that reads fp16 gets a Cast to float32 on its input, float32 scale/bias, and a Cast back to fp16 on its
   output. Their reductions (mean/variance over up to 40 x 32 x 48 values per group, the exp-sum over 77 or h*w
   keys) overflow fp16 (max 65504) or lose the small variances; TensorRT 8.6 warned "Running layernorm after
   self-attention in FP16 may cause overflow", and in strongly typed mode nothing else would protect it. Only the
   reduction is upcast: GroupNorm's affine Mul/Add stay fp16 (elementwise, nothing accumulates), and so do
   MatMul/Conv, whose accumulation happens in fp32 inside the GPU kernels and cannot be written in ONNX anyway.
   Nodes already computing in fp32 (CLIP's eager attention does its softmax in fp32) are left alone.
   If a TensorRT version's fused-attention matcher does not accept the Cast pair around Softmax, drop "Softmax"
   from the op list: fused attention kernels keep their softmax statistics in fp32 internally.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgery.passes import Pass, infer_tensor_types, named

FP16_UPCAST_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax")


def upcast_to_fp32(ops: Sequence[str] = FP16_UPCAST_OPS) -> Pass:
    """Run each `ops` node that reads fp16 in float32: Cast in, float32 parameters, Cast back out."""
    ops = tuple(ops)

    def pass_(graph: gs.Graph) -> None:
        types = infer_tensor_types(graph)
        for node in [n for n in graph.nodes if n.op in ops]:
            if types.get(node.inputs[0].name) != np.float16:
                continue
            for i, tensor in enumerate(node.inputs):
                if tensor.name and types.get(tensor.name) == np.float16:
                    node.inputs[i] = _as_fp32(graph, tensor, f"{node.name}/input{i}_fp32")
            # Only output 0 is data; LayerNormalization's optional Mean/InvStdDev are stash_type (fp32) already.
            out = node.outputs[0]
            out32 = gs.Variable(f"{node.name}/output_fp32", dtype=np.float32)
            node.outputs[0] = out32
            graph.nodes.append(_cast(f"{node.name}/cast_to_fp16", out32, out, onnx.TensorProto.FLOAT16))

    return named(f"upcast_to_fp32({len(ops)} ops)", pass_)


def _as_fp32(graph: gs.Graph, tensor: gs.Tensor, name: str) -> gs.Tensor:
    if isinstance(tensor, gs.Constant):
        # A fresh constant: the fp16 original may be shared with other (still fp16) consumers.
        return gs.Constant(name, np.asarray(tensor.values, dtype=np.float32))
    out = gs.Variable(name, dtype=np.float32)
    graph.nodes.append(_cast(f"{name}/cast", tensor, out, onnx.TensorProto.FLOAT))
    return out


def _cast(name: str, src: gs.Tensor, dst: gs.Tensor, to: int) -> gs.Node:
    return gs.Node("Cast", name=name, attrs={"to": to}, inputs=[src], outputs=[dst])

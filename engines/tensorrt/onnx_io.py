"""Read an exported ONNX file's inputs and outputs (without its weights) and check them against the contract.

Checked before a build, because a mismatch found by TensorRT an hour into tactic search, or by the runtime when a
buffer has the wrong shape, is far harder to read than "fused_step.onnx input x is (1, 4, 64, 64), expected ...".
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from models.step import TensorSpec, network_io
from profiles.config import Profile
from profiles.errors import ControlNetRTError

# onnx.TensorProto element types (stable numbers from onnx.proto), kept here so this table needs no onnx import.
ONNX_TO_TORCH = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
                 10: torch.float16, 16: torch.bfloat16}


def _spec(value_info) -> "TensorSpec | None":
    tensor_type = value_info.type.tensor_type
    dtype = ONNX_TO_TORCH.get(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return TensorSpec((), dtype) if dtype is not None else None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
    return TensorSpec(dims, dtype)


def read_onnx_io(path: "str | Path") -> "tuple[OrderedDict[str, TensorSpec], OrderedDict[str, TensorSpec]]":
    """(inputs, outputs) of an ONNX file; -1 marks a symbolic dimension. External weight files are not read."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ControlNetRTError(f"{path} not found: export the ONNX files first (surgery), then build the plans")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends on a truncated file
        raise ControlNetRTError(f"cannot read {path} ({type(exc).__name__}: {exc}): delete it and re-export") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = OrderedDict((v.name, _spec(v)) for v in model.graph.input if v.name not in initializers)
    outputs = OrderedDict((v.name, _spec(v)) for v in model.graph.output)
    return inputs, outputs


def check_onnx_io(path: "str | Path", expected: "OrderedDict[str, TensorSpec]", output_names) -> None:
    """Raise ControlNetRTError unless the file's inputs equal `expected`'s inputs (names, static shapes, dtypes)
    and its outputs carry the expected names (and shapes/dtypes where the file records them)."""
    inputs, outputs = read_onnx_io(path)
    want_in = OrderedDict((n, s) for n, s in expected.items() if n not in output_names)
    want_out = OrderedDict((n, s) for n, s in expected.items() if n in output_names)
    problems = []
    if set(inputs) != set(want_in):
        problems.append(f"inputs {sorted(inputs)} != expected {sorted(want_in)}")
    if set(outputs) != set(want_out):
        problems.append(f"outputs {sorted(outputs)} != expected {sorted(want_out)}")
    for name, want in want_in.items():
        got = inputs.get(name)
        if got is not None and (tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype):
            problems.append(f"input {name} is {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}")
    for name, want in want_out.items():
        got = outputs.get(name)
        if got is None:
            continue
        # Exporters may leave output dims symbolic (-1 here); only a recorded, different dim is an error.
        if got.shape and (len(got.shape) != len(want.shape)
                          or any(g not in (-1, w) for g, w in zip(got.shape, want.shape))):
            problems.append(f"output {name} is {tuple(got.shape)}, expected {tuple(want.shape)}")
        if got.dtype is not None and got.dtype != want.dtype:
            problems.append(f"output {name} is {got.dtype}, expected {want.dtype}")
    if problems:
        raise ControlNetRTError(f"{Path(path).name} does not match the I/O contract (models.step.network_io): "
                                + "; ".join(problems) + ". Re-export the ONNX files for this profile")


def contract_dims(fused_step_onnx: "str | Path") -> tuple[int, int]:
    """(context_dim, hint_channels) of the exported model, read from the fused step's `context` and
    `hint_features` inputs, so tiny test models and SD1.5 go through the same code."""
    inputs, _ = read_onnx_io(fused_step_onnx)
    try:
        context, hint = inputs["context"].shape, inputs["hint_features"].shape
        return int(context[2]), int(hint[1])
    except (KeyError, IndexError, AttributeError):
        raise ControlNetRTError(f"{fused_step_onnx} lacks the fused step's context/hint_features inputs: "
                                "re-export it (models.step.step_io names them)") from None


def check_onnx_dir(onnx_dir: "str | Path", profile: Profile, networks) -> tuple[int, int]:
    """Check every network's ONNX file against network_io; returns (context_dim, hint_channels)."""
    from models.step import NETWORK_OUTPUTS

    onnx_dir = Path(onnx_dir)
    context_dim, hint_channels = contract_dims(onnx_dir / "fused_step.onnx")
    io = network_io(profile, context_dim, hint_channels)
    for network in networks:
        check_onnx_io(onnx_dir / f"{network}.onnx", io[network], NETWORK_OUTPUTS[network])
    return context_dim, hint_channels

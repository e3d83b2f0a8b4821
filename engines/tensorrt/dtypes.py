"""TensorRT data types <-> torch dtypes, by the enum member's name.

Keyed on names (`trt.DataType.HALF.name == "HALF"`) rather than on the enum values, so the table is plain data that
tests can check without TensorRT, and members a given TensorRT version lacks (FP8 before 8.6, ...) cost nothing.
"""

from __future__ import annotations

import torch

from profiles.errors import ControlNetRTError

TRT_TO_TORCH: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,  # TensorRT's FP8 is E4M3
}
TORCH_TO_TRT: dict[torch.dtype, str] = {v: k for k, v in TRT_TO_TORCH.items()}


def trt_type_name(trt_dtype) -> str:
    """'HALF' for trt.DataType.HALF (pybind11 enums have .name; str() gives 'DataType.HALF')."""
    name = getattr(trt_dtype, "name", None)
    return str(name if name is not None else trt_dtype).split(".")[-1]


def torch_dtype(trt_dtype) -> torch.dtype:
    name = trt_type_name(trt_dtype)
    try:
        return TRT_TO_TORCH[name]
    except KeyError:
        raise ControlNetRTError(f"TensorRT tensor type {name} has no torch equivalent here: the plans must use "
                                f"{', '.join(TRT_TO_TORCH)} at their inputs and outputs (re-export the ONNX)") from None


def trt_dtype_name(dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_TRT[dtype]
    except KeyError:
        raise ControlNetRTError(f"torch dtype {dtype} has no TensorRT equivalent") from None

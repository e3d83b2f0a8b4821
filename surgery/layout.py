"""Where the ONNX artifacts live and what they are keyed on (and the progress log), without importing onnx.

Backends that only read the files (engines/onnxruntime_backend.py, a TensorRT builder) need the file names and the
manifest key recipe but none of the export machinery, so both live here, apart from surgery/build.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from profiles.config import Precision, Profile

# Bump whenever export or surgery changes what a file computes or how it is laid out: it is part of the manifest
# key, so every existing ONNX build goes stale and is rebuilt.
SURGERY_VERSION = 1
# 17 is the first opset with LayerNormalization; TensorRT 8.6 (the hackathon image) parses up to 17.
OPSET = 17

NETWORKS = ("text_encoder", "hint_encoder", "fused_step", "vae_decoder")
# The libraries whose versions change the exported graphs (onnxruntime: gs folds constants with it).
KEY_LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon")


def log(message: str) -> None:
    """One progress line to stderr (build stages and per-pass node counts); stdout stays for results."""
    print(message, file=sys.stderr, flush=True)


def onnx_filename(network: str) -> str:
    return f"{network}.onnx"


def external_data_filename(network: str) -> str:
    """The single side file holding a network's weights when it is too big for one protobuf (over 2 GB)."""
    return f"{network}.onnx.data"


def onnx_paths(onnx_dir: "str | Path") -> dict[str, Path]:
    return {net: Path(onnx_dir) / onnx_filename(net) for net in NETWORKS}


def profile_key(profile: Profile, precision: "Precision | None" = None) -> dict:
    """The part of the key that fixes the graphs' static shapes and precision."""
    precision = Precision(precision or profile.precision)
    return {"name": profile.name, "height": profile.height, "width": profile.width,
            "num_samples": profile.num_samples, "precision": precision.value}


def manifest_key(profile: Profile, weights_id: str, precision: "Precision | None" = None,
                 exporter: str = "torchscript", opset: int = OPSET) -> dict:
    from artifacts.manifest import library_versions

    return {"kind": "onnx", "profile": profile_key(profile, precision), "weights_id": weights_id,
            "surgery_version": SURGERY_VERSION, "exporter": exporter, "opset": opset,
            "libraries": library_versions(KEY_LIBRARIES)}

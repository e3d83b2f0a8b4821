"""ONNX export and graph surgery: torch modules -> the four ONNX files every non-torch backend builds from.

`build_onnx(bundle, profile, out_dir)` writes text_encoder.onnx, hint_encoder.onnx, fused_step.onnx (ControlNet +
UNet + CFG + DDIM merged into one graph) and vae_decoder.onnx, with the tensor names of `models.step.network_io`.
Layout: export.py (torch -> per-part ONNX), passes.py (small named graph passes), precision.py (fp16 policy),
fuse.py (the fused-step merge), onnx_io.py (atomic writes, external data), build.py (manifest, caching),
layout.py (file names and manifest key, importable without onnx). This package never imports engines/.
"""

from surgery.build import build_onnx
from surgery.layout import NETWORKS, OPSET, SURGERY_VERSION, manifest_key, onnx_paths

__all__ = ["NETWORKS", "OPSET", "SURGERY_VERSION", "build_onnx", "manifest_key", "onnx_paths"]

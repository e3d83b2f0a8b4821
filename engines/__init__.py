"""Backends for the fused step and the networks around it: torch, onnxruntime, TensorRT."""

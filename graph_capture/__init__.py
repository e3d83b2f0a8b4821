"""CUDA-graph capture (whole denoising loop in one graph) and NVTX ranges."""

from graph_capture.cuda_graph import GraphedFunction
from graph_capture.loop import DenoiseLoop
from graph_capture.nvtx import nvtx_range

__all__ = ["DenoiseLoop", "GraphedFunction", "nvtx_range"]

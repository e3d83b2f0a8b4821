"""The whole denoising loop (all DDIM steps, update included) as one function, eager or as ONE CUDA graph.

Launched from Python, 20 steps x (ControlNet + UNet) are launch-bound; captured, one replay per image runs them
back to back. Step k reads its constants from the runner's device tables, so the capture bakes in no Python floats,
and per-image inputs live in the runner's static buffers (StepRunner.prepare).
"""

from __future__ import annotations

import torch

from engines.base import StepRunner
from graph_capture.cuda_graph import GraphedFunction
from graph_capture.nvtx import nvtx_range


class DenoiseLoop:
    def __init__(self, runner: StepRunner, steps: int, use_graph: bool, pool=None):
        self.runner = runner
        self.steps = steps
        self.use_graph = use_graph
        self._graphed = GraphedFunction(self.run_eager, "the denoising loop", pool=pool, warmup_iters=1)

    @property
    def captured(self) -> bool:
        return self._graphed.captured

    def reset(self) -> None:
        """Drop the captured graph; the next call captures again (e.g. after changing a backend setting)."""
        self._graphed.reset()

    def run_eager(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.steps):
            with nvtx_range(f"step {k}"):
                x = self.runner.step(x, k)
        return x

    def __call__(self, x_T: torch.Tensor) -> torch.Tensor:
        """x_T (B, 4, h, w) float32 -> the final latent (a fresh tensor)."""
        if not self.use_graph:
            return self.run_eager(x_T)
        return self._graphed(x_T).clone()

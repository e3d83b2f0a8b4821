"""CUDA-graph capture of a tensor function over static buffers (stable-fast's hygiene, our own code).

- warm-up runs on a side stream (lazy inits, cuBLAS/cuDNN handles, autotuning happen outside the capture);
- inputs are static buffers: each call copies its arguments in, replays, and returns the static outputs;
- all graphs of one pipeline share one private memory pool; they are replayed in capture order, never concurrently;
- a capture failure is re-raised as ControlNetRTError saying how to run eagerly instead.
"""

from __future__ import annotations

from typing import Callable

import torch

from profiles.errors import ControlNetRTError

EAGER_HINT = "set CNRT_CUDA_GRAPHS=0 (or initialize(capture=False)) to run eagerly"


class GraphedFunction:
    """`fn(*tensors) -> tensor | tuple of tensors`, captured once on first call for the given input shapes."""

    def __init__(self, fn: Callable, name: str, pool=None, warmup_iters: int = 2):
        self.fn = fn
        self.name = name
        self.pool = pool
        self.warmup_iters = warmup_iters
        self._graph: "torch.cuda.CUDAGraph | None" = None
        self._static_in: list[torch.Tensor] = []
        self._static_out = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def reset(self) -> None:
        self._graph, self._static_in, self._static_out = None, [], None

    def __call__(self, *inputs: torch.Tensor):
        if self._graph is None or any(s.shape != i.shape or s.dtype != i.dtype for s, i in zip(self._static_in, inputs)):
            self._capture(inputs)
        for static, value in zip(self._static_in, inputs):
            if static.data_ptr() != value.data_ptr():
                static.copy_(value)
        self._graph.replay()
        return self._static_out

    @torch.no_grad()
    def _capture(self, inputs) -> None:
        self.reset()
        self._static_in = [x.detach().clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                self.fn(*self._static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self._static_out = self.fn(*self._static_in)
        except Exception as exc:
            self.reset()
            raise ControlNetRTError(f"CUDA graph capture of {self.name} failed ({type(exc).__name__}: {exc}); "
                                    f"{EAGER_HINT}") from exc
        self._graph = graph

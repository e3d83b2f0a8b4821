"""The torch backend's fast path: the fused step re-expressed for speed and compiled (see parts.py)."""

from engines.torch_fast.compile import CompileMode
from engines.torch_fast.runner import FastStepRunner, build_fast_engines

__all__ = ["CompileMode", "FastStepRunner", "build_fast_engines"]

"""Run a script under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is imported: hence a
subprocess). Scripts start with SHIM, which makes Triton 3.6's interpreter work with numpy >= 2.4."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHIM = r"""
import triton.runtime.interpreter as interpreter

original = interpreter._patch_lang_tensor
def patched(tensor, scope):  # Triton 3.6's interpreter calls int() on 1-element arrays; numpy >= 2.4 refuses
    original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interpreter._patch_lang_tensor = patched
"""


def run_interpreted(script: str, args: list[str], timeout: int = 300) -> str:
    """stdout of `SHIM + script` run with the given argv under the interpreter; fails the test on error."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", SHIM + script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

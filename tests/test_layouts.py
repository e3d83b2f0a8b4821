"""Memory layouts the compiled step depends on (bench/NOTES.md, fourteenth session): the decoder's skip concatenation
and the twin's CFG doubling give channels_last maps, and a compiled concatenation stores NHWC rows.

On an H100, Inductor stored `torch.cat([h, skip], dim=1)` of channels_last maps channel-major, and every reader paid
a transposition (loop 69.43 against 67.89 ms). The CPU's Inductor keeps channels_last there, so these tests check
the form that does not depend on the compiler's choice: a concatenation along the last dimension of NHWC views.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines.torch_fast import parts, pdl, twin


def _channels_last(*shape):
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def test_cat_channels_is_torch_cat_in_channels_last_memory():
    h, skip = _channels_last(2, 16, 4, 6), _channels_last(2, 8, 4, 6)
    got = parts.cat_channels(h, skip)
    assert torch.equal(got, torch.cat([h, skip], dim=1))
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_compiled_cat_channels_allocates_nhwc_rows():
    """The concatenation's buffer is an (N, H, W, C) contiguous allocation: channels_last whatever layout the
    compiler would pick for a dim-1 concatenation."""
    from torch._inductor.utils import run_and_get_code

    w = torch.randn(24, 5)

    def f(h, skip, control):
        x = parts.cat_channels(h, skip + control * 0.5)
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return torch.nn.functional.silu(x), rows @ w  # two readers: the concatenation is stored

    args = (_channels_last(2, 16, 4, 6), _channels_last(2, 8, 4, 6), _channels_last(2, 8, 4, 6))
    torch._dynamo.reset()
    got, (code, *_) = run_and_get_code(torch.compile(f), *args)
    torch.testing.assert_close(got[1], f(*args)[1])
    assert re.search(r"empty_strided_\w+\(\(2, 4, 6, 24\), \(576, 144, 24, 1\)", code), code


@pytest.mark.parametrize("shape", [(4, 8, 3, 5), (2, 6, 1, 1)])
def test_double_images_keeps_channels_last(shape):
    t = _channels_last(*shape)
    got = twin._double_images(t)
    per_group = t.reshape(twin.GROUPS, -1, *shape[1:])
    assert torch.equal(got, torch.cat([per_group, per_group], dim=1).reshape(-1, *shape[1:]))
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_pdl_trigger_mode_reaches_the_kernels(monkeypatch):
    """PDL == 2 (the default): our kernels trigger the next launch after their main loop (`pdl.pdl_end`); 1: at the
    start; off on the CPU."""
    assert pdl.launch_args(torch.device("cpu")) == {"PDL": False}
    env = {k: v for k, v in os.environ.items() if k != "CNRT_PDL_TRIGGER"}
    default = subprocess.run([sys.executable, "-c", "from engines.torch_fast import pdl; print(pdl.TRIGGER)"],
                             env=env, capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    assert default == "end"
    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    monkeypatch.setattr(pdl, "TRIGGER", "end")
    assert pdl.launch_args(torch.device("cpu")) == {"PDL": 2, "launch_pdl": True}
    monkeypatch.setattr(pdl, "TRIGGER", "start")
    assert pdl.launch_args(torch.device("cpu")) == {"PDL": 1, "launch_pdl": True}

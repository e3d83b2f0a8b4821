"""bench.ncu_kernels: the launcher Nsight Compute runs on the device.

CPU: every kernel it offers has a name pattern for ncu's -k and a description, and without a GPU it refuses to
launch instead of failing inside a kernel.
"""

from __future__ import annotations

import re

from bench import ncu_kernels


def test_list_names_every_kernel_with_a_pattern(capsys):
    assert ncu_kernels.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(ncu_kernels.KERNELS)
    for line, (name, (make, pattern)) in zip(out, ncu_kernels.KERNELS.items()):
        assert line.split()[0] == name and f"regex:'{pattern}'" in line
        re.compile(pattern)
        assert make.__doc__


def test_refuses_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(ncu_kernels.torch.cuda, "is_available", lambda: False)
    assert ncu_kernels.main(["geglu"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err

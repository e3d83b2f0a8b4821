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


def test_ncu_script_runs_ncu_per_kernel_and_summarises(tmp_path):
    """tools/ncu_kernels.sh with a stand-in `ncu` on PATH: it profiles the kernel by its pattern and prints the
    metric values and the stall reasons above 0.05 (the real ncu runs on the device only)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    fake = tmp_path / "bin" / "ncu"
    fake.parent.mkdir()
    fake.write_text("#!/usr/bin/env bash\n"
                    "echo \"args: $*\"\n"
                    "echo '    gpu__time_duration.sum                          us        35.87'\n"
                    "echo '    smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio    0.38'\n"
                    "echo '    smsp__average_warps_issue_stalled_drain_per_issue_active.ratio      0.01'\n")
    fake.chmod(0o755)
    python = tmp_path / "bin" / "python3"  # the interpreter running the tests, under the name the script calls
    python.symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "PYTHONPATH": str(root)}
    done = subprocess.run(["bash", str(root / "tools" / "ncu_kernels.sh"), str(tmp_path / "out"), "geglu"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "== geglu (rc 0)" in done.stdout
    assert "gpu__time_duration.sum us 35.87" in done.stdout
    assert "stall barrier 0.38" in done.stdout and "drain" not in done.stdout
    log = (tmp_path / "out" / "ncu_geglu.txt").read_text()
    assert "-k regex:_geglu_tma_kernel" in log and "bench.ncu_kernels geglu" in log

"""The twin's CFG doubling as one copy kernel (`engines/torch_fast/doubling.py`, CNRT_MATERIALIZE_DOUBLING).

CPU: the kernel through Triton's interpreter (groups, a tail shorter than a program's block), its 16-byte vectors in
the sm_90a SASS, and the switch's two forms of `twin._double_images` eagerly and compiled. The twin step's parity
(`tests/test_twin.py`) runs with the switch at its default, on. GPU: the operator inside torch.compile, with PDL,
against torch.cat.
"""

from __future__ import annotations

import pytest
import torch

from engines.torch_fast import doubling, twin
from tests.triton_interpreter import run_interpreted

KERNEL_CHECK = r"""
import torch
from engines.torch_fast import doubling
torch.manual_seed(0)
for shape in [(2, 3, 5, 7), (2, 1, 1), (2, 3, 1500), (1, 4, 2)]:  # 3 x 1500 = 4500: two full blocks and a tail
    t = torch.randn(*shape).half()
    got = doubling.twice(t.transpose(-1, -2).transpose(-1, -2))
    assert got.is_contiguous() and torch.equal(got, torch.cat([t, t], dim=1)), shape
print("ok")
"""


def test_kernel_writes_each_group_twice_interpreted():
    assert run_interpreted(KERNEL_CHECK, []).strip().splitlines()[-1] == "ok"


def test_kernel_moves_16_byte_vectors_on_sm90():
    """Compiled for an H100 on the CPU (Triton's ptxas), as the step launches it (PDL, aligned rows): every load
    and store is a 16-byte vector."""
    sass = pytest.importorskip("bench.sass")
    if sass.triton is None:
        pytest.skip("needs Triton")
    t = torch.empty(8, dtype=torch.float16)
    kernel = sass.compile_sm90(doubling._twice_kernel, dict(src_ptr=t, dst_ptr=t, PER_GROUP=2 * 1536 * 160),
                               dict(BLOCK=doubling.BLOCK, PDL=2), num_warps=4, num_stages=1)
    widths = [op for op in sass.opcodes(sass.sass(kernel)) if op.startswith(("LDG", "STG"))]
    assert widths and all(op.endswith(".128") for op in widths), widths


def test_twice_needs_groups_and_rows():
    with pytest.raises(ValueError, match="twice needs"):
        doubling.twice(torch.zeros(4))


@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("shape", [(4, 8, 3, 5), (2, 6, 1, 1)])
def test_double_images_forms_agree_and_keep_channels_last(shape, enabled, monkeypatch):
    """Both forms of the doubling (the concatenation Inductor may fold, or the operator's own buffer) give
    [copy, copy] per network, channels_last, eagerly and compiled."""
    monkeypatch.setattr(doubling, "ENABLED", enabled)
    t = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
    per_group = t.reshape(twin.GROUPS, -1, *shape[1:])
    want = torch.cat([per_group, per_group], dim=1).reshape(-1, *shape[1:])
    got = twin._double_images(t)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(twin._double_images, fullgraph=True)(t), want)


@pytest.mark.gpu
def test_operator_equals_cat_on_the_gpu_inside_compile():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    g = torch.Generator("cuda").manual_seed(1)
    rows = torch.randn(2, 1536, 320, device="cuda", generator=g).half()

    def f(x):
        return doubling.twice_op(x * 2) + 1

    got = torch.compile(f, fullgraph=True)(rows)
    assert torch.equal(got, torch.cat([rows * 2, rows * 2], dim=1) + 1)
    assert torch.equal(doubling.twice(rows), torch.cat([rows, rows], dim=1))

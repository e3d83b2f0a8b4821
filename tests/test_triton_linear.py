"""The Triton TMA GEMM of `bench.linear_kernels` (engines/torch_fast/triton_linear.py) computes x @ W + bias + c.

CPU: the kernel through Triton's interpreter, unsplit and split along K, for nn.Linear weights (read transposed) and
the twin's stacked (G, K, N) ones, with row counts that do not fill the last tile and an N that is not a multiple
of the tile. The candidate list keeps only splits that divide K into whole K steps.
"""

from __future__ import annotations

import pytest

from engines.torch_fast import triton_linear as tli
from tests.triton_interpreter import run_interpreted

LINEAR_CHECK = r"""
import sys
import torch
from engines.torch_fast import triton_linear as tli
groups, m, k, n, bias, acc, split = (int(v) for v in sys.argv[1:])
torch.manual_seed(0)
x = torch.randn(*([m] if groups == 1 else [groups, m]), k)
w = torch.randn(n, k) if groups == 1 else torch.randn(groups, k, n)
b = (torch.randn(n) if groups == 1 else torch.randn(groups, n)) if bias else None
c = torch.randn(*x.shape[:-1], n) if acc else None
got = tli.linear(x, w, b, tli.LinearConfig(64, 64, 4, 2, split), c=c)
print((got - tli.reference(x, w, b, c)).abs().max().item())
"""


@pytest.mark.parametrize("groups, m, k, n, bias, acc, split", [
    (1, 100, 128, 96, 1, 0, 1), (1, 70, 256, 128, 0, 1, 2), (2, 40, 192, 64, 1, 1, 3), (2, 65, 128, 80, 1, 0, 1)])
def test_linear_kernel_equals_reference_interpreted(groups, m, k, n, bias, acc, split):
    out = run_interpreted(LINEAR_CHECK, [str(v) for v in (groups, m, k, n, bias, acc, split)], timeout=600)
    assert float(out.strip().splitlines()[-1]) < 1e-3


def test_candidates_split_k_into_whole_steps():
    configs = tli.candidate_configs(1, 192, 1280, 1280)
    assert configs and all(1280 % (c.split * tli.BLOCK_K) == 0 for c in configs)
    assert {c.split for c in configs} >= {1, 2, 4, 5, 10}


def test_shapes_that_do_not_chain_are_refused():
    import torch

    with pytest.raises(ValueError, match="does not chain"):
        tli.linear(torch.randn(4, 64), torch.randn(32, 48), None, tli.LinearConfig(64, 64, 4, 2))

"""bench.cublaslt_algos poses the step's row-major GEMMs in cuBLAS's column-major terms: check that mapping on the
CPU by emulating what cuBLAS computes from the same storage."""

import pytest
import torch

from bench.cublaslt_algos import column_major_problem, emulate


@pytest.mark.parametrize("groups,m,k,n", [(1, 6, 5, 3), (1, 48, 32, 96), (2, 7, 4, 9), (2, 48, 64, 32)])
def test_column_major_problem_computes_the_row_major_product(groups, m, k, n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*(() if groups == 1 else (groups,)), m, k, generator=g, dtype=torch.float64)
    w = torch.randn(*((n, k) if groups == 1 else (groups, k, n)), generator=g, dtype=torch.float64)
    ref = x @ w.t() if groups == 1 else torch.bmm(x, w)
    p = column_major_problem(groups, m, k, n)
    assert p.transa == (groups == 1)
    assert (p.d.rows, p.d.cols) == (n, m)  # D = y^T
    torch.testing.assert_close(emulate(p, x, w), ref)


def test_a_transposed_weight_layout_gives_another_product():
    # the check above can fail: with op(A) not transposed, nn.Linear's weight gives a different (wrong) product
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64)
    p = column_major_problem(1, 8, 8, 8)
    wrong = type(p)(transa=False, a=p.a, b=p.b, d=p.d)
    assert not torch.allclose(emulate(wrong, x, w), x @ w.t())

"""`python3 -m bench.cublaslt_algos`: would a cuBLASLt algorithm search speed up the step's GEMMs?

Why: torch runs each GEMM on the first algorithm of cuBLASLt's heuristic, and its TunableOp offers no other on CUDA
(bench/NOTES.md, nineteenth session), so "cuBLASLt algorithm search" stayed on the levers list unmeasured. This asks
`cublasLtMatmulAlgoGetHeuristic` for up to 64 algorithms per shape of the step's transformer GEMMs (through ctypes
on the libcublasLt torch has loaded: no extra package), checks each one's result against fp32, and times torch's own
call and every algorithm as the conv tuner times (CUDA graph over rotating copies, weights streamed from DRAM).

Measured (H100, twentieth session, two runs): the heuristic returns 8 algorithms per shape, and the best of them
beats torch's call by 6-10 us a step over the 21 shapes (0.12-0.19 ms a loop); several shapes are slower on every
other algorithm. So an algorithm search is not a lever for this step.

Row-major products are posed in cuBLAS's column-major terms as D^T = op(A) B (`column_major_problem`):
nn.Linear y (M, N) = x (M, K) W^T with W (N, K), and the twin's batched y (G, M, N) = x (G, M, K) W (G, K, N).
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import torch

from bench.linear_kernels import LEVELS, cublas_call, weight_copies
from engines.torch_fast.conv_tuning import graph_time_us

# (GEMM, K / C, N / C, bias, accumulate into the output, calls a transformer): the step's shapes since the folds
# (the cross-attention's projections are in folded_cross; the last ff2 is inside proj_out's K = 5C GEMM)
OPS = [("proj_in / out", 1, 1, True, False, 2), ("qkv", 1, 3, False, False, 1),
       ("proj_out K=5C", 5, 1, False, True, 1)]
MAX_ALGOS = 64
WORKSPACE_BYTES = 64 << 20

# cuBLASLt enumerations (cublasLt.h)
_R16F, _R32F, _COMPUTE_32F = 2, 0, 68
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER, _DESC_BIAS_DATA_TYPE = 3, 4, 7, 8, 26
_LAYOUT_BATCH_COUNT, _LAYOUT_STRIDED_BATCH_OFFSET = 5, 6
_PREF_MAX_WORKSPACE_BYTES = 1
_EPILOGUE_BIAS = 4


@dataclass(frozen=True)
class Matrix:
    """A column-major matrix as cuBLASLt's layout descriptor takes it: rows, cols, leading dimension, batch."""

    rows: int
    cols: int
    ld: int
    batch: int = 1
    stride: int = 0  # elements between batch entries


@dataclass(frozen=True)
class ColumnMajorProblem:
    """D = op(A) @ B in column-major terms: A is the weight, B the activations x^T, D the output y^T."""

    transa: bool
    a: Matrix
    b: Matrix
    d: Matrix


def column_major_problem(groups: int, m: int, k: int, n: int) -> ColumnMajorProblem:
    """The row-major y = x W^T (groups == 1, W (N, K) as nn.Linear) or y[g] = x[g] W[g] (W (G, K, N)) as cuBLAS
    sees it: a row-major (R, C) matrix is a column-major (C, R) one with leading dimension C."""
    if groups == 1:
        a = Matrix(k, n, k)  # W (N, K) row-major is (K, N) column-major: op(A) = A^T, (N, K)
    else:
        a = Matrix(n, k, n, groups, k * n)  # W (K, N) row-major is (N, K) column-major
    return ColumnMajorProblem(transa=groups == 1, a=a, b=Matrix(k, m, k, groups, m * k),
                              d=Matrix(n, m, n, groups, m * n))


def emulate(p: ColumnMajorProblem, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What cuBLAS computes from x's and w's flat storage under problem p, read back as row-major y (CPU check of
    `column_major_problem`)."""

    def matrices(flat: torch.Tensor, mat: Matrix) -> torch.Tensor:  # (batch, rows, cols) from column-major storage
        return torch.stack([flat[i * mat.stride:i * mat.stride + mat.ld * mat.cols].reshape(mat.cols, mat.ld)
                            [:, :mat.rows].t() for i in range(mat.batch)])

    a = matrices(w.reshape(-1), p.a)
    a = a.transpose(1, 2) if p.transa else a
    d = a @ matrices(x.reshape(-1), p.b)  # (batch, N, M) column-major D
    return d.transpose(1, 2).reshape(*x.shape[:-1], p.d.rows)


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLt:
    """The libcublasLt that torch loaded (found in /proc/self/maps after a half-precision matmul)."""

    def __init__(self):
        torch.ones(8, 8, device="cuda", dtype=torch.half) @ torch.ones(8, 8, device="cuda", dtype=torch.half)
        paths = [line.split()[-1] for line in open("/proc/self/maps") if "libcublasLt.so" in line]
        if not paths:
            raise RuntimeError("libcublasLt is not loaded in this process")
        self.lib = ctypes.CDLL(paths[0])
        self.handle = ctypes.c_void_p()
        self.check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: cuBLAS status {status}")

    def set(self, fn, obj, attr: int, value, ctype) -> None:
        v = ctype(value)
        self.check(fn(obj, attr, ctypes.byref(v), ctypes.sizeof(v)), f"set attribute {attr}")

    def layout(self, mat: Matrix) -> ctypes.c_void_p:
        lay = ctypes.c_void_p()
        self.check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), _R16F, ctypes.c_uint64(mat.rows),
                                                       ctypes.c_uint64(mat.cols), ctypes.c_int64(mat.ld)),
                   "cublasLtMatrixLayoutCreate")
        if mat.batch > 1:
            self.set(self.lib.cublasLtMatrixLayoutSetAttribute, lay, _LAYOUT_BATCH_COUNT, mat.batch, ctypes.c_int32)
            self.set(self.lib.cublasLtMatrixLayoutSetAttribute, lay, _LAYOUT_STRIDED_BATCH_OFFSET, mat.stride,
                     ctypes.c_int64)
        return lay


class Matmul:
    """One GEMM shape: its descriptors and the heuristic's algorithms; `run` launches one of them on torch's
    current stream (capturable in a CUDA graph)."""

    def __init__(self, lt: CublasLt, groups: int, m: int, k: int, n: int, bias: bool, accumulate: bool):
        self.lt, self.accumulate = lt, accumulate
        problem = column_major_problem(groups, m, k, n)
        lib = lt.lib
        self.desc = ctypes.c_void_p()
        lt.check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R32F), "MatmulDescCreate")
        lt.set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_TRANSA, int(problem.transa), ctypes.c_int32)
        lt.set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_TRANSB, 0, ctypes.c_int32)
        if bias:
            lt.set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_EPILOGUE, _EPILOGUE_BIAS, ctypes.c_uint32)
            lt.set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_BIAS_DATA_TYPE, _R16F, ctypes.c_int32)
        self.a, self.b, self.d = lt.layout(problem.a), lt.layout(problem.b), lt.layout(problem.d)
        pref = ctypes.c_void_p()
        lt.check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        lt.set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES, WORKSPACE_BYTES,
               ctypes.c_uint64)
        found = (_Heuristic * MAX_ALGOS)()
        count = ctypes.c_int()
        lt.check(lib.cublasLtMatmulAlgoGetHeuristic(lt.handle, self.desc, self.a, self.b, self.d, self.d, pref,
                                                    MAX_ALGOS, found, ctypes.byref(count)), "AlgoGetHeuristic")
        self.algos = [found[i] for i in range(count.value) if found[i].state == 0]
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def run(self, algo: _Heuristic, x: torch.Tensor, w: torch.Tensor, b: "torch.Tensor | None",
            y: torch.Tensor) -> None:
        lib, lt = self.lt.lib, self.lt
        if b is not None:
            ptr = ctypes.c_void_p(b.data_ptr())
            lt.check(lib.cublasLtMatmulDescSetAttribute(self.desc, _DESC_BIAS_POINTER, ctypes.byref(ptr), 8), "bias")
        lt.check(lib.cublasLtMatmul(lt.handle, self.desc, ctypes.byref(self.one), ctypes.c_void_p(w.data_ptr()),
                                    self.a, ctypes.c_void_p(x.data_ptr()), self.b,
                                    ctypes.byref(self.one if self.accumulate else self.zero),
                                    ctypes.c_void_p(y.data_ptr()), self.d, ctypes.c_void_p(y.data_ptr()), self.d,
                                    ctypes.byref(algo.algo), ctypes.c_void_p(lt.workspace.data_ptr()),
                                    ctypes.c_size_t(WORKSPACE_BYTES),
                                    ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "cublasLtMatmul")


def time_shape(lt: CublasLt, groups: int, m: int, k: int, n: int, bias: bool, accumulate: bool) -> dict:
    """torch's call and the best checked algorithm, us a call; plus how many algorithms were offered / rejected."""
    dev, dt = torch.device("cuda"), torch.half
    copies = weight_copies(groups * k * n * 2)  # enough that the weights leave L2
    gen = torch.Generator(device=dev).manual_seed(0)
    lead = () if groups == 1 else (groups,)
    xs = [torch.randn(*lead, m, k, device=dev, dtype=dt, generator=gen) for _ in range(copies)]
    wshape = (n, k) if groups == 1 else (groups, k, n)
    ws = [torch.randn(*wshape, device=dev, dtype=dt, generator=gen) * k ** -0.5 for _ in range(copies)]
    bs = [torch.randn(n, device=dev, dtype=dt, generator=gen) if bias else None for _ in range(copies)]
    ys = [torch.randn(*lead, m, n, device=dev, dtype=dt, generator=gen) for _ in range(copies)]

    y0 = ys[0].clone()
    product = xs[0].float() @ (ws[0].float().t() if groups == 1 else ws[0].float())
    ref = product + (y0.float() if accumulate else 0) + (bs[0].float() if bias else 0)
    base = graph_time_us(lambda i: cublas_call(groups, accumulate, xs[i], ws[i], bs[i], ys[i]), copies)
    mm = Matmul(lt, groups, m, k, n, bias, accumulate)
    best, rejected = float("inf"), 0
    for algo in mm.algos:
        out = y0.clone()
        mm.run(algo, xs[0], ws[0], bs[0], out)
        if not ((out.float() - ref).norm() / ref.norm()).item() < 2e-3:
            rejected += 1
            continue
        best = min(best, graph_time_us(lambda i, a=algo: (lambda: mm.run(a, xs[i], ws[i], bs[i], ys[i])), copies))
    return {"torch_us": base, "best_us": best, "algos": len(mm.algos), "rejected": rejected}


def main() -> int:
    lt = CublasLt()
    total_torch = total_best = 0.0
    print(f"{'level':8s} {'gemm':14s} G {'M':>5s} {'K':>5s} {'N':>5s} calls  torch  best  algos rejected", flush=True)
    for level, groups, m, ch, per_level in LEVELS:
        for name, kk, nn_, bias, accumulate, per_block in OPS:
            bias = bias and groups == 1  # the twin adds its biases in the consumer's kernel
            r = time_shape(lt, groups, m, kk * ch, nn_ * ch, bias, accumulate)
            calls = per_level * per_block
            total_torch += calls * r["torch_us"]
            total_best += calls * min(r["torch_us"], r["best_us"])
            print(f"{level:8s} {name:14s} {groups} {m:5d} {kk * ch:5d} {nn_ * ch:5d} {calls:5d} {r['torch_us']:6.1f} "
                  f"{r['best_us']:5.1f} {r['algos']:6d} {r['rejected']:8d}", flush=True)
    print(f"one step: torch {total_torch:.0f} us -> the best algorithm per shape {total_best:.0f} us "
          f"({(total_torch - total_best) * 20 / 1e3:.2f} ms a loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

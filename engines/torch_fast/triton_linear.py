"""The transformer blocks' small GEMMs as one Triton TMA kernel, with an optional split of K.

Why: a step runs 112 GEMMs, almost all of them cuBLAS calls of 4-14 us (bench/NOTES.md, eleventh session). At the
8x12 and 4x6 levels they are weight-bound: 192 (or 48) rows against 1280-wide matrices. cuBLAS tiles them without
splitting K, e.g. 64x48 tiles for (192 x 1280) @ (1280 x 1280): 81 programs, each walking all of K, so the 3.3 MB
of weights stream at about 0.6 TB/s (5.9 us). Splitting K spreads the weights over every SM; the fp32 partial sums
are added by whoever reads the product (`triton_conv.sum_partials`, which Inductor fuses into the consumer), as the
split convolutions already do.

`linear` is the kernel: x (rows, K) with an nn.Linear weight (N, K) read transposed, or the twin's (G, rows, K)
with stacked (G, K, N) matrices; an optional bias and an optional residual c added in the epilogue (unsplit), or
fp32 partials (split). Tiles come from a `LinearConfig`; a per-shape choice is measured by `bench.linear_kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

BLOCK_K = 64


@dataclass(frozen=True)
class LinearConfig:
    """One tiling: output tile BLOCK_M x BLOCK_N, warps, pipeline stages, and `split` programs along K (each
    walks K / split; K / split must be a multiple of BLOCK_K)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split: int = 1

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "LinearConfig":
        return cls(**d)


# Tiles tried per shape (the GEGLU kernel's TMA tiles and a wider one: a plain GEMM has one accumulator)
TILES = ((128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (64, 64, 4, 6), (64, 256, 8, 3),
         (128, 256, 8, 3), (256, 64, 8, 3), (64, 128, 4, 6))
SPLITS = (1, 2, 3, 4, 5, 6, 8, 10, 16, 20)


def candidate_configs(groups: int, m: int, k: int, n: int, max_programs: int = 1056) -> list[LinearConfig]:
    """Every tile x split that divides K into BLOCK_K multiples and launches at most `max_programs` programs."""
    out = []
    for bm, bn, warps, stages in TILES:
        if bn > max(64, triton.next_power_of_2(n) if triton else n):
            continue
        tiles = -(-m // bm) * -(-n // bn) * groups
        for split in SPLITS:
            if k % (split * BLOCK_K) or tiles * split > max_programs:
                continue
            out.append(LinearConfig(bm, bn, warps, stages, split))
    return out


if triton is not None:
    from engines.torch_fast.triton_geglu import _weight_tile

    @triton.jit
    def _linear_tma_kernel(a_desc, w_desc, bias_ptr, c_ptr, out_ptr, M, N, K, SPLITS, s_bg, s_cg, s_cm, s_os, s_og,
                           s_om, HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, W_KN: tl.constexpr,
                           PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        """Program (m, n, g * SPLITS + s): rows m.., columns n.. of group g over the s-th K / SPLITS slice of K.
        a_desc: (G * M, K) rows (tiles past a group's rows read the next group's and are not stored); w_desc:
        (G * K, N) if W_KN else the (N, K) Linear weight. PARTIAL: store fp32 into out[s, g]; else add the bias
        and c[g] and store in out's dtype (out may be c itself)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        z = tl.program_id(2)
        g = z // SPLITS
        s = z % SPLITS
        k_len = K // SPLITS
        k_begin = s * k_len
        row0 = g * M + pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_begin, k_begin + k_len, BLOCK_K):
            acc = tl.dot(a_desc.load([row0, k0]), _weight_tile(w_desc, g, K, k0, n0, W_KN), acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if PARTIAL:
            tl.store(out_ptr + s * s_os + g * s_og + offs_m[:, None] * s_om + offs_n[None, :], acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + g * s_bg + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            if HAS_C:
                acc += tl.load(c_ptr + g * s_cg + offs_m[:, None] * s_cm + offs_n[None, :], mask=mask,
                               other=0.0).to(tl.float32)
            tl.store(out_ptr + g * s_og + offs_m[:, None] * s_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)


def _shape(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int]:
    """(groups, rows a group, K, N) of x @ weight; raises on shapes that do not chain."""
    k = x.shape[-1]
    if weight.dim() == 3:
        groups, wk, n = weight.shape
        if x.dim() != 3 or x.shape[0] != groups:
            raise ValueError(f"linear: stacked weight {tuple(weight.shape)} needs x (G, rows, K), got "
                             f"{tuple(x.shape)}")
    else:
        groups, (n, wk) = 1, weight.shape
    if wk != k:
        raise ValueError(f"linear: x {tuple(x.shape)} does not chain with weight {tuple(weight.shape)}")
    return groups, x.numel() // (groups * k), k, n


def reference(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None" = None,
              c: "torch.Tensor | None" = None) -> torch.Tensor:
    """x @ W + bias + c in torch (the CPU path, and what the kernel is checked against)."""
    if weight.dim() == 3:
        out = torch.bmm(x, weight) + (0 if bias is None else bias[:, None, :])
    else:
        out = torch.nn.functional.linear(x, weight, bias)
    return out if c is None else out + c


def linear_partials(x: torch.Tensor, weight: torch.Tensor, config: LinearConfig) -> torch.Tensor:
    """fp32 partial products (split, G, rows, N) of x @ W over config.split slices of K (no bias)."""
    return _launch(x, weight, None, None, config, partial=True)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None", config: LinearConfig,
           c: "torch.Tensor | None" = None, out: "torch.Tensor | None" = None) -> torch.Tensor:
    """x @ W + bias (+ c) in x's dtype. x (rows.., K) with an (N, K) Linear weight, or (G, rows, K) with a stacked
    (G, K, N) weight; bias (N,) / (G, N) or None; c of the product's shape or None. A split config sums its
    partials in torch (`triton_conv.sum_partials`). out: where to write (may be c) for unsplit configs."""
    if config.split == 1:
        return _launch(x, weight, bias, c, config, partial=False, out=out)
    from engines.torch_fast.triton_conv import sum_partials

    groups, m, k, n = _shape(x, weight)
    total = sum_partials(linear_partials(x, weight, config).reshape(config.split, groups * m, n))
    if bias is not None:
        total = total.reshape(groups, m, n) + bias.reshape(groups, 1, n).float()
    total = total.reshape(*x.shape[:-1], n)
    if c is not None:
        total = total + c
    return total.to(x.dtype)


def _launch(x, weight, bias, c, cfg: LinearConfig, partial: bool, out=None) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    groups, m, k, n = _shape(x, weight)
    if k % (cfg.split * BLOCK_K):
        raise ValueError(f"linear: K={k} is not a multiple of split {cfg.split} x {BLOCK_K}")
    w_kn = weight.dim() == 3
    a = x.reshape(groups * m, k).contiguous()
    a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, BLOCK_K])
    w = weight.contiguous()
    w_desc = (TensorDescriptor.from_tensor(w.reshape(groups * k, n), [BLOCK_K, cfg.block_n]) if w_kn
              else TensorDescriptor.from_tensor(w, [cfg.block_n, BLOCK_K]))
    if partial:
        out = torch.empty(cfg.split, groups, m, n, device=x.device, dtype=torch.float32)
        s_os, s_og, s_om = out.stride(0), out.stride(1), out.stride(2)
    else:
        if out is None:
            out = torch.empty(groups, m, n, device=x.device, dtype=x.dtype)
        o = out.reshape(groups, m, n)
        s_os, s_og, s_om = 0, o.stride(0), o.stride(1)
    b = None if bias is None else bias.reshape(-1, n)
    cc = None if c is None else c.reshape(groups, m, n)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), groups * cfg.split)
    _linear_tma_kernel[grid](
        a_desc, w_desc, out if b is None else b, out if cc is None else cc, out, m, n, k, cfg.split,
        0 if b is None or b.shape[0] == 1 else b.stride(0), 0 if cc is None else cc.stride(0),
        0 if cc is None else cc.stride(1), s_os, s_og, s_om,
        HAS_BIAS=b is not None, HAS_C=cc is not None, W_KN=w_kn, PARTIAL=partial, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=BLOCK_K, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial:
        return out
    return out.reshape(*x.shape[:-1], n)

"""The feed-forward's first half, GEGLU, as one Triton GEMM: hidden * gelu(gate) leaves the kernel, not [hidden, gate].

Why: every transformer block's feed-forward starts with proj (C -> 2 * 4C) and then `hidden * F.gelu(gate)`. With
cuBLAS the GEMM writes the 2 * 4C-wide product and an Inductor kernel reads it back for the GELU: at 32x48 on the
twin encoder that kernel alone takes 15 us a call, and the GELU kernels add up to about 107 us a step, 2.1 ms a loop
on an H200 (bench/NOTES.md, session 5). Here each program computes the hidden and the gate tile of the same output
columns (two accumulators over the same A tile), adds the biases and writes hidden * gelu(gate): half the GEMM's
stores and no second kernel.

`geglu` is what the step calls: the kernel (as the operator cnrt::geglu_linear, which torch.compile keeps whole)
on CUDA for shapes it tiles (K a multiple of 64, 4C a multiple of 128), else the same arithmetic in torch. On CUDA
the operator runs the TMA variant (`geglu_linear_tma`: A and weight tiles as bulk tensor copies), autotuned per
shape: loop 73.00 against 73.67 ms with the pointer-loading kernel on one H200 (bench/NOTES.md, session 7).
Weights are used as they lie: (2 * 4C, K) nn.Linear weights or the twin's stacked (groups, K, 2 * 4C) matrices.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from engines.torch_fast import pdl
from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

BLOCK_K = 64
MIN_BLOCK_N = 128  # the output width must be a multiple of every config's BLOCK_N
# The widest ratio N / P of a prefix (`prefix_ratio`): with the TMA tiles' smallest BLOCK_N, 64, every program still
# copies at least two prefix columns
PREFIX_MAX_RATIO = 32
ENABLED = env_flag("CNRT_TRITON_GEGLU", True)  # 0: cuBLAS GEMM + Inductor GELU (A/B measurements)
TMA = env_flag("CNRT_GEGLU_TMA", True)  # 0: the step's kernel loads its tiles by pointers (A/B measurements)
# The TMA kernel loads its biases before the K loop, as the accumulators' initial values (0: in the epilogue, after
# the K loop, where their loads' latency is exposed). One step's calls 322 against 334 us on an H100, loop 64.97
# against 65.28 ms (bench/NOTES.md, nineteenth session).
EARLY_BIAS = env_flag("CNRT_GEGLU_EARLY_BIAS", True)

if triton is not None:
    # their own names: Inductor re-emits a traced kernel's callees by name
    from engines.torch_fast.pdl import pdl_begin, pdl_end

    def _configs():
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in ((128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4),
                                     (128, 128, 8, 4), (64, 128, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3),
                                     (128, 128, 8, 2))]

    @triton.jit
    def _epilogue(acc_h, acc_g, bias_ptr, out_ptr, g, offs_m, offs_n, M, N_OUT, s_bg, s_og, s_om,
                  HAS_BIAS: tl.constexpr, GELU: tl.constexpr = True):
        """Both kernels' end: the biases, hidden * gelu(gate) (exact GELU, as F.gelu) and the store of the rows
        below M of group g's output tile. GELU=False stores hidden * gate: not GEGLU, only the bound on what the
        GELU costs (`python3 -m bench.geglu_kernels --epilogue`)."""
        if HAS_BIAS:
            acc_h += tl.load(bias_ptr + g * s_bg + offs_n).to(tl.float32)[None, :]
            acc_g += tl.load(bias_ptr + g * s_bg + N_OUT + offs_n).to(tl.float32)[None, :]
        if GELU:
            out = acc_h * (0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476)))
        else:
            out = acc_h * acc_g
        tl.store(out_ptr + g * s_og + offs_m[:, None] * s_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(offs_m < M)[:, None])

    @triton.jit
    def _geglu_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, M, N_OUT, K,
                      s_ag, s_am, s_wg, s_wk, s_wn, s_bg, s_og, s_om,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        a_ptrs = a_ptr + g * s_ag + offs_m[:, None] * s_am + offs_k[None, :]
        h_ptrs = w_ptr + g * s_wg + offs_k[:, None] * s_wk + offs_n[None, :] * s_wn  # (BLOCK_K, BLOCK_N)
        gate_offset = N_OUT * s_wn  # the gate's columns follow the hidden ones
        acc_h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for _ in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (checked by the caller)
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            acc_h = tl.dot(a, tl.load(h_ptrs), acc_h)
            acc_g = tl.dot(a, tl.load(h_ptrs + gate_offset), acc_g)
            a_ptrs += BLOCK_K
            h_ptrs += BLOCK_K * s_wk
        pdl_end(PDL)
        _epilogue(acc_h, acc_g, bias_ptr, out_ptr, g, offs_m, offs_n, M, N_OUT, s_bg, s_og, s_om, HAS_BIAS)

    @triton.jit
    def _weight_tile(w_desc, g, K, k0, n, W_KN: tl.constexpr):
        """The (BLOCK_K, BLOCK_N) weight tile of input rows k0.. and output columns n.. of group g: from stacked
        (G * K, N) matrices if W_KN, else read transposed from an (N, K) nn.Linear weight."""
        if W_KN:
            tile = w_desc.load([g * K + k0, n])
        else:
            tile = w_desc.load([n, k0]).T
        return tile

    @triton.jit
    def _geglu_tma_kernel(a_desc, w_desc, bias_ptr, out_ptr, prefix_ptr, M, N_OUT, K, s_bg, s_og, s_om, s_pg,
                          s_pm, HAS_BIAS: tl.constexpr, W_KN: tl.constexpr, PREFIX: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr = False, GELU: tl.constexpr = True, EARLY_BIAS: tl.constexpr = False):
        """The same GEMM with A and both weight tiles as bulk tensor copies (TMA). a_desc: (G * M, K) rows, tiles
        past a group's rows read the next group's and are not stored. w_desc: (G * K, 2N) if W_KN (the twin's
        stacked matrices) else the (2N, K) Linear weight. EARLY_BIAS: the biases start the accumulators (loaded
        before the K loop) instead of being added in the epilogue; the fp32 sums then add them first.
        PREFIX > 0: each output row is [prefix row (N_OUT / PREFIX columns), hidden * gelu(gate)]; program (m, n)
        copies its BLOCK_N / PREFIX columns of the prefix rows as well."""
        pdl_begin(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        row0 = g * M + pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        if PREFIX > 0:
            offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_p = pid_n * (BLOCK_N // PREFIX) + tl.arange(0, BLOCK_N // PREFIX)
            r_ok = (offs_r < M)[:, None]
            v = tl.load(prefix_ptr + g * s_pg + offs_r[:, None] * s_pm + offs_p[None, :], mask=r_ok)
            tl.store(out_ptr + g * s_og + offs_r[:, None] * s_om + offs_p[None, :], v, mask=r_ok)
            out_ptr += N_OUT // PREFIX
        acc_h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if EARLY_BIAS and HAS_BIAS:  # the biases' loads in flight during the K loop (their latency hidden)
            offs_b = n0 + tl.arange(0, BLOCK_N)
            acc_h += tl.load(bias_ptr + g * s_bg + offs_b).to(tl.float32)[None, :]
            acc_g += tl.load(bias_ptr + g * s_bg + N_OUT + offs_b).to(tl.float32)[None, :]
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row0, k0])
            acc_h = tl.dot(a, _weight_tile(w_desc, g, K, k0, n0, W_KN), acc_h)
            acc_g = tl.dot(a, _weight_tile(w_desc, g, K, k0, N_OUT + n0, W_KN), acc_g)
        pdl_end(PDL)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        _epilogue(acc_h, acc_g, bias_ptr, out_ptr, g, offs_m, offs_n, M, N_OUT, s_bg, s_og, s_om,
                  HAS_BIAS and not EARLY_BIAS, GELU)

    # Tuned once per shape on first use (outside CUDA-graph capture: the runner warms every part up first).
    _geglu_tuned = triton.autotune(configs=_configs(), key=["M", "N_OUT", "K", "s_wn"])(_geglu_kernel)

    def _set_tma_blocks(nargs):
        """The descriptors' tile shapes follow the config being run (as in Triton's persistent-matmul tutorial)."""
        bm, bn = nargs["BLOCK_M"], nargs["BLOCK_N"]
        nargs["a_desc"].block_shape = [bm, BLOCK_K]
        nargs["w_desc"].block_shape = [BLOCK_K, bn] if nargs["W_KN"] else [bn, BLOCK_K]

    # The tiles `python3 -m bench.geglu_kernels` tried; 128x256 needs more shared memory than an H200 has.
    TMA_TILES = ((128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 3), (128, 64, 4, 4), (64, 128, 4, 3),
                 (64, 128, 4, 4), (64, 64, 4, 4), (64, 64, 4, 6), (64, 256, 8, 3), (256, 64, 8, 3))
    _geglu_tma_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st, pre_hook=_set_tma_blocks)
                 for bm, bn, w, st in TMA_TILES],
        key=["M", "N_OUT", "K", "W_KN", "PREFIX", "EARLY_BIAS"],
        prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
            c for c in configs if nargs["N_OUT"] % c.kwargs["BLOCK_N"] == 0]})(_geglu_tma_kernel)


def _as_groups(weight: torch.Tensor, bias: "torch.Tensor | None"):
    """-> (weight as (G, K, 2N) strided view, bias (G, 2N) or None): nn.Linear (2N, K) weights are read transposed."""
    if weight.dim() == 2:
        weight, bias = weight.t()[None], None if bias is None else bias[None]
    return weight, bias


def reference(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None",
              prefix: "torch.Tensor | None" = None) -> torch.Tensor:
    """hidden * gelu(gate) for [hidden, gate] = x @ W (+ bias), in torch: the CPU path and the kernel's reference.
    x (rows.., K) with a (2N, K) Linear weight, or (G, rows, K) with a stacked (G, K, 2N) one. prefix (rows..,
    P): the result is [prefix, hidden * gelu(gate)] along the last dimension."""
    if weight.dim() == 2:
        product = F.linear(x, weight, bias)
    else:
        product = torch.bmm(x, weight) + (0 if bias is None else bias[:, None, :])
    hidden, gate = product.chunk(2, dim=-1)
    out = hidden * F.gelu(gate)
    return out if prefix is None else torch.cat([prefix.to(out.dtype), out], dim=-1)


def output_width(weight: torch.Tensor) -> int:
    """N, the width of hidden * gelu(gate), for a (2N, K) Linear weight or a stacked (G, K, 2N) one."""
    return (weight.shape[0] if weight.dim() == 2 else weight.shape[2]) // 2


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.shape[-1] % BLOCK_K == 0 and output_width(weight) % MIN_BLOCK_N == 0


def _require_fits(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not fits(x, weight):
        raise ValueError(f"K={x.shape[-1]} must be a multiple of {BLOCK_K} and the output width of {MIN_BLOCK_N}")


def geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None",
                 config: "tuple[int, int, int, int] | None" = None) -> torch.Tensor:
    """The kernel itself: x (rows.., K) with an nn.Linear weight (2N, K), or x (G, rows, K) with a stacked weight
    (G, K, 2N); bias (2N,) / (G, 2N) or None. -> (rows.., N) / (G, rows, N) in x's dtype.
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages); None autotunes over _configs() (needs a GPU)."""
    _require_fits(x, weight)
    w, b = _as_groups(weight, bias)
    groups, k, n_out = w.shape[0], w.shape[1], output_width(weight)
    a = x.reshape(groups, -1, k)
    if a.stride(-1) != 1:
        a = a.contiguous()
    m = a.shape[1]
    out = torch.empty(groups, m, n_out, device=x.device, dtype=x.dtype)
    args = (a, w, b if b is not None else w, out, m, n_out, k, a.stride(0), a.stride(1), w.stride(0), w.stride(1),
            w.stride(2), 0 if b is None else b.stride(0), out.stride(0), out.stride(1))
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n_out // meta["BLOCK_N"], groups)  # noqa: E731
        _geglu_tuned[grid](*args, HAS_BIAS=b is not None, BLOCK_K=BLOCK_K, **pdl.launch_args(x.device))
    else:
        block_m, block_n, warps, stages = config
        _geglu_kernel[(triton.cdiv(m, block_m), n_out // block_n, groups)](
            *args, HAS_BIAS=b is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, num_warps=warps,
            num_stages=stages, **pdl.launch_args(x.device))
    return out.reshape(*x.shape[:-1], n_out)


def prefix_ratio(x: torch.Tensor, weight: torch.Tensor, prefix: "torch.Tensor | None") -> int:
    """N / P for a prefix of P columns (0 without one): a power of two of at most PREFIX_MAX_RATIO, so that every
    config's BLOCK_N splits into whole prefix chunks of at least two columns. Raises on other prefixes."""
    if prefix is None:
        return 0
    n_out, width = output_width(weight), prefix.shape[-1]
    ratio = n_out // width if width else 0
    if (prefix.shape[:-1] != x.shape[:-1] or not ratio or ratio * width != n_out or ratio & (ratio - 1)
            or ratio > PREFIX_MAX_RATIO or prefix.dtype != x.dtype):
        raise ValueError(f"prefix {tuple(prefix.shape)} ({prefix.dtype}) cannot lead rows of {n_out} GEGLU columns "
                         f"for x {tuple(x.shape)} ({x.dtype}): its width must be the output's divided by a power "
                         f"of two up to {PREFIX_MAX_RATIO}")
    return ratio


def geglu_linear_tma(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None",
                     config: "tuple[int, ...] | None" = None,
                     prefix: "torch.Tensor | None" = None, gelu: bool = True,
                     early_bias: "bool | None" = None) -> torch.Tensor:
    """`geglu_linear` through the TMA kernel, with one (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) config
    (maxnreg: a cap on registers a thread, so that more programs fit an SM); None autotunes over TMA_TILES per
    shape (needs a GPU). prefix (x's rows, P): the output is [prefix, GEGLU] per row
    (`prefix_ratio` says which widths P). gelu=False (a config required) writes hidden * gate instead: a
    measurement of the epilogue's cost, not a result the step uses. early_bias: the kernel's EARLY_BIAS (None:
    CNRT_GEGLU_EARLY_BIAS)."""
    if not gelu and config is None:
        raise ValueError("gelu=False is a timing probe: pass a config (the autotuner's choice is for GEGLU)")
    from triton.tools.tensor_descriptor import TensorDescriptor

    _require_fits(x, weight)
    ratio = prefix_ratio(x, weight, prefix)
    block_m, block_n, warps, stages, *cap = config or (64, 64, 4, 4)  # autotuning resets the descriptors' blocks
    registers = {"maxnreg": cap[0]} if cap and cap[0] else {}
    early = EARLY_BIAS if early_bias is None else early_bias
    w_kn = weight.dim() == 3
    b = bias if bias is None or bias.dim() == 2 else bias[None]
    groups = weight.shape[0] if w_kn else 1
    k, n_out = x.shape[-1], output_width(weight)
    a = x.reshape(groups, -1, k).contiguous()
    m = a.shape[1]
    a_desc = TensorDescriptor.from_tensor(a.reshape(groups * m, k), [block_m, BLOCK_K])
    w_desc = (TensorDescriptor.from_tensor(weight.contiguous().reshape(groups * k, 2 * n_out), [BLOCK_K, block_n])
              if w_kn else TensorDescriptor.from_tensor(weight.contiguous(), [block_n, BLOCK_K]))
    width = n_out + (n_out // ratio if ratio else 0)
    out = torch.empty(groups, m, width, device=x.device, dtype=x.dtype)
    p = out if prefix is None else prefix.reshape(groups, m, -1).contiguous()
    args = (a_desc, w_desc, b if b is not None else out, out, p, m, n_out, k, 0 if b is None else b.stride(0),
            out.stride(0), out.stride(1), p.stride(0), p.stride(1))
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n_out // meta["BLOCK_N"], groups)  # noqa: E731
        _geglu_tma_tuned[grid](*args, HAS_BIAS=b is not None, W_KN=w_kn, PREFIX=ratio, BLOCK_K=BLOCK_K,
                               EARLY_BIAS=early, **pdl.launch_args(x.device))
    else:
        _geglu_tma_kernel[(triton.cdiv(m, block_m), n_out // block_n, groups)](
            *args, HAS_BIAS=b is not None, W_KN=w_kn, PREFIX=ratio, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=BLOCK_K, num_warps=warps, num_stages=stages, GELU=gelu, EARLY_BIAS=early, **registers,
            **pdl.launch_args(x.device))
    return out.reshape(*x.shape[:-1], width)


if triton is not None:

    @torch.library.custom_op("cnrt::geglu_linear", mutates_args=(), device_types="cuda")
    def _geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return geglu_linear_tma(x, weight, bias) if TMA else geglu_linear(x, weight, bias)

    @_geglu_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], output_width(weight))

    @torch.library.custom_op("cnrt::geglu_linear_prefixed", mutates_args=(), device_types="cuda")
    def _geglu_prefixed_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           prefix: torch.Tensor) -> torch.Tensor:
        return geglu_linear_tma(x, weight, bias, prefix=prefix)

    @_geglu_prefixed_op.register_fake
    def _(x, weight, bias, prefix):
        return x.new_empty(*x.shape[:-1], prefix.shape[-1] + output_width(weight))


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None",
          prefix: "torch.Tensor | None" = None) -> torch.Tensor:
    """hidden * gelu(gate) of x's projection: the Triton kernel on CUDA where it tiles the shape, else torch.
    prefix (x's rows, P): [prefix, hidden * gelu(gate)] per row instead, written by the same kernel (TMA only)."""
    if ENABLED and triton is not None and x.is_cuda and fits(x, weight):
        if prefix is None:
            return torch.ops.cnrt.geglu_linear(x, weight, bias)
        if TMA:
            prefix_ratio(x, weight, prefix)  # raises here, not inside the compiled graph
            return torch.ops.cnrt.geglu_linear_prefixed(x, weight, bias, prefix)
        return torch.cat([prefix, torch.ops.cnrt.geglu_linear(x, weight, bias)], dim=-1)
    return reference(x, weight, bias, prefix)

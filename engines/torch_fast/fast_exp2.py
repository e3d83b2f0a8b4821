"""The attention softmax's exp2, one exponential in every POLY_EVERY computed on the FMA pipe instead of the MUFU.

Why: at d = 40 (the head size of every SD1.5 attention) a score costs about as much special-function work as
tensor-core work. An H100 SM issues 16 exp2 a clock on its MUFU and 4096 fp16 FLOP a clock on its tensor cores;
a score of the 32x48 self-attention costs one exp2 (1/16 of a clock) and 2 x 2 x 64 FLOP for q k^T and P V with
the head padded to 64 (also 1/16 of a clock), while its other softmax work (the scale and subtraction, the row
maximum and sum, the fp16 pack) is about 4.5 FP32 instructions, 1/28 of a clock at 128 a clock. So the MUFU is as
much a bound as the tensor cores (bench/NOTES.md, twenty-sixth session), and the Gluon kernel's 23.5 us at batch 2
is close to the two run one after the other (2 x 10.2 us) plus its prologue. FlashAttention-4 moves part of the
exponentials to the FMA pipe, which has room: Cody-Waite range reduction (x = j + f, j = round(x), |f| <= 1/2,
by the 1.5 * 2^23 rounding trick), 2^f by a degree-3 polynomial, and j added to the result's exponent bits. One
in four balances the two pipes at about 1.2k clocks a 64-row block where the MUFU takes 1.5k today; a packed
fp16 exp2 (`ex2.approx.f16x2`) does not help: ptxas splits it into two MUFU.EX2.F16 (checked in its SASS).

Accuracy: the polynomial (a relative-error minimax fit on [-1/2, 1/2], coefficients rounded to fp32) is within
7.6e-5 of 2^f, a sixth of fp16's half ulp; P is rounded to fp16 for the P V product right after. Inputs are
clamped at -125 so that j plus the polynomial's exponent stays a normal number: -inf (masked keys) gives 2^-125
instead of 0, against row sums of at least 1. The MUFU's exponentials use `ex2.approx.ftz.f32` as Triton's
`exp2` does (no denormal results either way at these magnitudes).

`POLY_EVERY` (CNRT_ATTENTION_EXP2_POLY: 0, the default, is `exp2` everywhere; 2 or 4) is a constexpr of the
attention kernels; `asm` gives the inline PTX for `inline_asm_elementwise` with pack = POLY_EVERY, whose last
element of each pack takes the polynomial. `reference` is the same arithmetic in torch, for tests on the CPU.
"""

from __future__ import annotations

import os
import struct

import torch

try:
    import triton
except ImportError:  # CPU-only installs without Triton
    triton = None

# 2^f ~ C0 + C1 f + C2 f^2 + C3 f^3 on [-1/2, 1/2] (relative-error minimax, fp32)
COEFFS = (0.9999281764030457, 0.6932609677314758, 0.24260950088500977, 0.05517100170254707)
CLAMP = -125.0  # the smallest input: j + (the polynomial's exponent, -1 or 0) must stay >= -126
ROUNDER = 12582912.0  # 1.5 * 2^23: x + ROUNDER keeps round(x) in its low mantissa bits
CHOICES = (0, 2, 4)


def _every_from_env() -> int:
    value = os.environ.get("CNRT_ATTENTION_EXP2_POLY", "0").strip() or "0"
    try:
        every = int(value)
    except ValueError:
        every = -1
    if every not in CHOICES:
        raise ValueError(f"CNRT_ATTENTION_EXP2_POLY must be one of {CHOICES} (0: off), got {value!r}")
    return every


POLY_EVERY = _every_from_env()


def _f32(v: float) -> str:
    """A float as a PTX fp32 literal (0fXXXXXXXX)."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", v))[0]


def _asm(every: int) -> str:
    if every not in CHOICES[1:]:
        raise ValueError(f"poly_every must be one of {CHOICES[1:]}, got {every}")
    mufu = "".join(f"ex2.approx.ftz.f32 ${i}, ${every + i};\n" for i in range(every - 1))
    out, arg = every - 1, 2 * every - 1
    c0, c1, c2, c3 = (_f32(c) for c in COEFFS)
    return ("{\n.reg .f32 c, t, j, f, p;\n.reg .b32 n, e;\n" + mufu
            + f"max.ftz.f32 c, ${arg}, {_f32(CLAMP)};\n"
            f"add.rn.ftz.f32 t, c, {_f32(ROUNDER)};\n"   # round(c) in t's low mantissa bits
            f"sub.rn.ftz.f32 j, t, {_f32(ROUNDER)};\n"   # round(c)
            "sub.rn.ftz.f32 f, c, j;\n"                  # |f| <= 1/2
            f"fma.rn.ftz.f32 p, f, {c3}, {c2};\n"
            f"fma.rn.ftz.f32 p, p, f, {c1};\n"
            f"fma.rn.ftz.f32 p, p, f, {c0};\n"
            "shl.b32 n, t, 23;\n"                        # round(c) << 23: the exponent's increment
            "mov.b32 e, p;\n"
            "add.s32 e, e, n;\n"
            f"mov.b32 ${out}, e;\n}}")


def _constraints(every: int) -> str:
    return ",".join(["=f"] * every + ["f"] * every)  # `every` fp32 outputs, then as many inputs


# built here: Triton walks the body of a constexpr function called from a kernel and refuses calls to plain ones
_ASM = {every: _asm(every) for every in CHOICES[1:]}
_CONSTRAINTS = {every: _constraints(every) for every in CHOICES[1:]}


def asm(every: int) -> str:
    """The PTX for `inline_asm_elementwise(..., pack=every)`: exp2 of `every` fp32 inputs, the last by the
    polynomial."""
    return _ASM[every]


def constraints(every: int) -> str:
    """inline_asm_elementwise's constraints for `asm(every)`."""
    return _CONSTRAINTS[every]


if triton is not None:  # callable from a kernel
    asm = triton.constexpr_function(asm)
    constraints = triton.constexpr_function(constraints)


def reference(x: torch.Tensor, every: int = 4) -> torch.Tensor:
    """What the kernels compute for fp32 x (CPU or GPU): exp2 for every element but the last of each `every`
    along the last dimension, which takes the polynomial (its fp32 steps; torch may not fuse the multiply-adds,
    which changes the last bit at most)."""
    out = torch.exp2(x)
    flat = out.reshape(-1, every)
    c = x.reshape(-1, every)[:, -1].float().clamp_min(CLAMP)
    t = c + ROUNDER
    f = c - (t - ROUNDER)
    c0, c1, c2, c3 = COEFFS
    p = ((c3 * f + c2) * f + c1) * f + c0
    flat[:, -1] = ((p.view(torch.int32) + (t.view(torch.int32) << 23)).view(torch.float32)).to(out.dtype)
    return out

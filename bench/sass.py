"""`python3 -m bench.sass`: the step's Triton and Gluon kernels compiled for an H100 on this machine, summarised
from their SASS. No GPU is needed: Triton's wheel ships ptxas and cuobjdump.

Why: device time is scarce (30 minutes a session), and some questions about a kernel are answered by its machine
code alone. Two were this way in the eighteenth session (bench/NOTES.md):
- the Gluon GEGLU probe stored its tile in 2-byte pieces (`STG.E.U16`, or 4-byte `STG.E` once the launch's
  alignment was known) where Triton's kernels store 16-byte vectors: part of why it was slower;
- the step's Triton attention kernel waits for each wgmma right after issuing it (`WARPGROUP.DEPBAR.LE gsb0, 0x0`
  after both the QK and the PV products) and loads K and V through registers (`LDG` then `STS`, then `BAR.SYNC`),
  so its tensor-core work and its softmax never overlap within a warpgroup.

`compile_sm90` compiles a `triton.jit` or `gluon.jit` function from example arguments as the JIT would at launch
(16-byte aligned pointers, integers divisible by 16 marked so), `sass` disassembles the cubin and `summary` counts
the instruction classes that matter here: tensor-core MMAs and the waits on them, barriers, special-function
calls, global loads and stores by width, shared-memory traffic, local-memory spills and bulk tensor copies.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch

try:
    import triton
except ImportError:  # CPU-only installs without Triton
    triton = None

# instruction classes counted by `summary`: (label, regular expression over one SASS instruction's opcode)
CLASSES = (
    ("wgmma", r"^HGMMA\."),
    ("wgmma waits", r"^WARPGROUP\.DEPBAR"),
    ("CTA barriers", r"^BAR\.(SYNC|ARV|RED)"),
    ("mbarrier waits", r"^SYNCS\.PHASECHK"),
    ("special functions (MUFU)", r"^MUFU\."),
    ("TMA loads", r"^UTMALDG"),
    ("TMA stores", r"^UTMASTG"),
    ("global loads", r"^LDG"),
    ("shared stores", r"^STS"),
    ("shared loads", r"^(LDS|LDSM)"),
    ("spill stores", r"^STL"),
    ("spill loads", r"^LDL"),
)
STORE_WIDTH = re.compile(r"^STG\.E(\.(U8|S8|U16|S16|64|128))?\b")
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def compile_sm90(fn, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3, **options):
    """The CompiledKernel of `fn` for sm_90a. args: every runtime argument by name (tensors, possibly on the CPU,
    Triton or Gluon TensorDescriptors, ints, floats); constexprs: the constant ones (parameters with a default
    may be left out; the default is then compiled in). Pointers and integers
    divisible by 16 carry the divisibility the JIT would record at launch, so loads and stores vectorise as
    they would on the GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    gluon = getattr(fn, "is_gluon", lambda: False)()
    names = fn.arg_names
    defaults = {p.name: p.default for p in fn.params if p.default is not inspect.Parameter.empty}
    constexprs = {**{n: v for n, v in defaults.items() if n not in args}, **constexprs}
    missing = [n for n in names if n not in args and n not in constexprs]
    if missing:
        raise ValueError(f"compile_sm90: no value for {missing}")
    signature = {n: "constexpr" if n in constexprs else mangle_type(args[n]) for n in names}
    aligned = [n for n in names if n not in constexprs and (
        (isinstance(args[n], torch.Tensor) and args[n].data_ptr() % 16 == 0)
        or (isinstance(args[n], int) and not isinstance(args[n], bool) and args[n] % 16 == 0))]
    source_args = dict(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource
        source = GluonASTSource(**source_args)
    else:
        source = ASTSource(**source_args)
    opts = {"num_warps": num_warps, **options}
    if not gluon:  # a Gluon kernel states its own pipelining
        opts["num_stages"] = num_stages
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=opts)


def sass(kernel) -> str:
    """The SASS of a CompiledKernel's cubin, by the cuobjdump in Triton's wheel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        done = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True)
    return done.stdout


def opcodes(text: str) -> list[str]:
    """The opcode of every instruction of a SASS listing, in order (predicates dropped)."""
    out = []
    for line in text.splitlines():
        m = _OPCODE.match(line)
        if m and line.rstrip().endswith(("*/", ";")) and ";" in line:
            out.append(m.group(2))
    return out


def summary(text: str) -> dict:
    """Instruction counts of a SASS listing: the CLASSES, and global stores by width in bytes
    ({'global stores (16 B)': n, ...})."""
    ops = opcodes(text)
    counts = {label: sum(1 for op in ops if re.match(pattern, op)) for label, pattern in CLASSES}
    widths = collections.Counter()
    for op in ops:
        m = STORE_WIDTH.match(op)
        if m:
            suffix = m.group(2)
            widths[{None: 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}[suffix]] += 1
    for width in sorted(widths):
        counts[f"global stores ({width} B)"] = widths[width]
    counts["instructions"] = len(ops)
    return counts


def _attention_kernel():
    """The step's Triton attention at the 32x48 self-attention (batch 2, d = 40), with the step's block sizes."""
    from engines.torch_fast import triton_attention as ta

    block_m, block_n, warps, stages = ta.block_sizes(1536, 1536)
    block_d, block_d2 = ta.head_blocks(40)
    t = torch.empty(8, dtype=torch.float16)
    args = dict(q_ptr=t, k_ptr=t, v_ptr=t, o_ptr=t, **{n: 16 for n in (
        "sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_t", "sv_b", "sv_h", "sv_t", "so_b", "so_h", "so_t")},
        HEADS=8, TQ=1536, TK=1536, qk_scale=0.1)
    constexprs = dict(HEAD_D=40, VEC=ta.VEC, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_D2=block_d2,
                      EVEN_N=True, PDL=2)
    return compile_sm90(ta._attention_kernel, args, constexprs, warps, stages)


def _geglu_kernel(config=(128, 64, 4, 3), early_bias: bool = True):
    """The step's Triton GEGLU (TMA) at the twin's 32x48 shape (2 x 3072 x 320 -> 1280), one TMA tile; early_bias:
    the kernel's EARLY_BIAS (biases loaded before the K loop, the step's default since the nineteenth session;
    False: added in the epilogue)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from engines.torch_fast import triton_geglu as tg

    block_m, block_n, warps, stages = config
    groups, m, k, n_out = 2, 3072, 320, 1280
    a = torch.empty(groups * m, k, dtype=torch.float16)
    w = torch.empty(groups * k, 2 * n_out, dtype=torch.float16)
    out = torch.empty(groups, m, n_out, dtype=torch.float16)
    args = dict(a_desc=TensorDescriptor.from_tensor(a, [block_m, tg.BLOCK_K]),
                w_desc=TensorDescriptor.from_tensor(w, [tg.BLOCK_K, block_n]),
                bias_ptr=torch.empty(groups, 2 * n_out, dtype=torch.float16), out_ptr=out, prefix_ptr=out, M=m,
                N_OUT=n_out, K=k, s_bg=2 * n_out, s_og=m * n_out, s_om=n_out, s_pg=m * n_out, s_pm=n_out)
    constexprs = dict(HAS_BIAS=True, W_KN=True, PREFIX=0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=tg.BLOCK_K,
                      GELU=True, PDL=2, EARLY_BIAS=early_bias)
    return compile_sm90(tg._geglu_tma_kernel, args, constexprs, warps, stages)


def _conv_tma_kernel():
    """The step's TMA convolution at the decoder's 8x12 conv2 (2x1280x8x12 -> 1280) with the H100 table's config
    (`bench.ncu_kernels.conv_8x12_config`, the one ncu profiles). Its A tile, a 4-D box, is reshaped to 2-D through
    registers, so every wgmma takes A from registers and is waited for at once (bench/NOTES.md, nineteenth
    session)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from bench.ncu_kernels import conv_8x12_config
    from engines.torch_fast import triton_conv as tc

    cfg = conv_8x12_config()
    (bi, bh, bw), c, cout, h, w = cfg.box, 1280, 1280, 8, 12
    x = TensorDescriptor.from_tensor(torch.empty(2, h, w, c, dtype=torch.float16), [bi, bh, bw, cfg.block_k])
    wd = TensorDescriptor.from_tensor(torch.empty(9 * c, cout, dtype=torch.float16), [cfg.block_k, cfg.block_n])
    t = torch.empty(16, dtype=torch.float16)
    args = dict(x_desc=x, w_desc=wd, x2_desc=x, bias_ptr=t, out_ptr=torch.empty(16, dtype=torch.float32), res_ptr=t,
                ws_ptr=t, count_ptr=t, N_IMG=2, OH=h, OW=w, C=c, COUT=cout, KROWS=9 * c,
                K_STEPS_PER_SPLIT=9 * c // cfg.block_k // cfg.split_k, SPLIT=cfg.split_k, GROUPS=1, M=2 * h * w,
                BIAS_STRIDE=0, TILES_Y=-(-h // bh), TILES_X=-(-w // bw))
    constexprs = dict(PAD=1, KSIZE=3, HAS_BIAS=False, HAS_SHORTCUT=False, HAS_RESIDUAL=False, FIXUP=False,
                      BOX_I=bi, BOX_H=bh, BOX_W=bw, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PDL=2)
    return compile_sm90(tc._conv_tma_kernel, args, constexprs, cfg.num_warps, cfg.num_stages)


def _gluon_geglu_kernel(coalesced: bool):
    from bench import gluon_geglu as gg

    return gg.compile_sm90(True, (128, 64, 4, 4, 1, int(coalesced)), k=320, n_out=1280, rows=3072)


KERNELS = {
    "attention": _attention_kernel,
    "geglu": _geglu_kernel,
    "geglu-late-bias": lambda: _geglu_kernel(early_bias=False),
    "conv-tma": _conv_tma_kernel,
    "gluon-geglu": lambda: _gluon_geglu_kernel(True),
    "gluon-geglu-direct-store": lambda: _gluon_geglu_kernel(False),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernels", nargs="*", default=list(KERNELS), help=f"any of {', '.join(KERNELS)}")
    p.add_argument("--sass-dir", default=None, help="also write each kernel's SASS listing into this directory")
    a = p.parse_args(argv)
    if triton is None:
        print("needs Triton", file=sys.stderr)
        return 1
    for name in a.kernels:
        kernel = KERNELS[name]()
        text = sass(kernel)
        if a.sass_dir:
            os.makedirs(a.sass_dir, exist_ok=True)
            with open(os.path.join(a.sass_dir, f"{name}.sass"), "w") as f:
                f.write(text)
        counts = summary(text)
        print(f"{name}: shared memory {kernel.metadata.shared} B; "
              + ", ".join(f"{label} {n}" for label, n in counts.items() if n))
    return 0


if __name__ == "__main__":
    sys.exit(main())

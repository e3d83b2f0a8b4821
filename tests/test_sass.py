"""bench.sass: kernels compiled for an H100 on the CPU, and their SASS summarised.

CPU only (Triton ships ptxas and cuobjdump). The summary's parsing on a hand-written listing; the step's Triton
attention and GEGLU kernels compiled as the JIT would launch them (16-byte stores, wgmma, no spills); the Gluon
GEGLU probe's two epilogues (coalesced 16-byte stores against 4-byte stores from the accumulators' layout), the
difference the eighteenth session found by this route.
"""

from __future__ import annotations

import pytest

sass = pytest.importorskip("bench.sass")
if sass.triton is None:
    pytest.skip("needs Triton", allow_module_level=True)

LISTING = """
        /*0100*/                   HGMMA.64x64x16.F32 R24, gdesc[UR16], RZ, !UPT ;   /* 0x00e00000101879f0 */
        /*0110*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                   /* 0x00008000000079c5 */
        /*0120*/              @!P0 STG.E.U16 desc[UR58][R6.64], R41 ;                 /* 0x000000290600c986 */
        /*0130*/                   STG.E.128 desc[UR4][R2.64], R8 ;                  /* 0x0000000802007986 */
        /*0140*/                   STG.E desc[UR4][R2.64], R8 ;                      /* 0x0000000802007986 */
        /*0150*/                   MUFU.EX2 R133, R134 ;                             /* 0x0000008600857308 */
        /*0160*/                   STL [R1], R2 ;                                    /* 0x0000000201007387 */
        /*0170*/              @!P0 BRA 0x100 ;                                        /* 0xffffffe000148947 */
"""


def test_summary_counts_instruction_classes_and_store_widths():
    counts = sass.summary(LISTING)
    assert counts["wgmma"] == 1 and counts["wgmma waits"] == 1
    assert counts["special functions (MUFU)"] == 1 and counts["spill stores"] == 1
    assert counts["global stores (2 B)"] == 1
    assert counts["global stores (16 B)"] == 1
    assert counts["global stores (4 B)"] == 1
    assert counts["instructions"] == 8


@pytest.mark.parametrize("name", ["attention", "geglu", "conv-tma"])
def test_step_kernels_compile_for_sm90(name):
    kernel = sass.KERNELS[name]()
    counts = sass.summary(sass.sass(kernel))
    assert counts["wgmma"] > 0
    assert counts["spill stores"] == 0 and counts["spill loads"] == 0
    assert counts.get("global stores (16 B)", 0) > 0
    assert not any(counts.get(f"global stores ({w} B)", 0) for w in (1, 2, 4))


def test_gluon_geglu_epilogue_store_widths():
    gg = pytest.importorskip("bench.gluon_geglu")
    if gg.gluon is None:
        pytest.skip("needs Triton with Gluon")
    coalesced = sass.summary(sass.sass(sass.KERNELS["gluon-geglu"]()))
    direct = sass.summary(sass.sass(sass.KERNELS["gluon-geglu-direct-store"]()))
    assert coalesced.get("global stores (16 B)", 0) > 0 and "global stores (4 B)" not in coalesced
    assert direct.get("global stores (4 B)", 0) > 0 and "global stores (16 B)" not in direct


def test_compile_refuses_missing_arguments():
    from engines.torch_fast import triton_attention as ta

    with pytest.raises(ValueError, match="no value for"):
        sass.compile_sm90(ta._attention_kernel, {}, {})


def test_early_bias_loads_precede_the_k_loop():
    """CNRT_GEGLU_EARLY_BIAS (default) puts the GEGLU kernel's only global loads (the biases) before its first
    wgmma; with it off they come after it, in the epilogue."""
    def order(name):
        ops = sass.opcodes(sass.sass(sass.KERNELS[name]()))
        first_mma = next(i for i, op in enumerate(ops) if op.startswith("HGMMA"))
        loads = [i for i, op in enumerate(ops) if op.startswith("LDG")]
        return first_mma, loads

    first_mma, loads = order("geglu")
    assert loads and max(loads) < first_mma
    first_mma, loads = order("geglu-late-bias")
    assert loads and min(loads) > first_mma

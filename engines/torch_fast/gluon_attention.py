"""The 32x48 self-attentions (1536 tokens, 8 heads of 40) as a warp-specialized Gluon kernel.

Why: the step's five 32x48 self-attentions (the decoder's three at batch 2, the twin's first block at one row a
network, its second at batch 4) ran on cuDNN SDPA, 33.8 us a call at batch 2 on an H100, plus a memset and idle
time before each in the loop; our Triton kernel takes 35.4 us there (bench/NOTES.md, twenty-first session). At
d = 40 a score costs about as much special-function work (its exp2) as tensor-core work, and Triton waits for
each wgmma right after issuing it. Gluon gives the kernel its own schedule:
- a producer warp streams K and V by TMA through a ring of STAGES shared-memory stages, each stage released by
  every consumer once its P V has read it; Q is loaded once;
- three consumer warpgroups each own 64 query rows of one (image, head), 192 rows a CTA, so that batch 2 is one
  wave of 128 CTAs on 132 SMs;
- with PINGPONG the consumers take turns issuing their products (named barriers 8-10, FA3's scheme), so one's
  softmax runs while the others' products do. Off by default: without the turns, 128-key blocks take 23.5 us at
  batch 2 and 48.3 at batch 4 against 25.6 / 52.5 with them, and the loop 64.38 against 64.69 ms (one H100).
The head is padded to 64 by the copy engine: the descriptors see q, k and v as (rows, heads, d) tensors with
64-wide boxes, so the columns past d load as zeros and add nothing. The output goes out as 16-byte vectors (with
2-byte stores, 12% of the kernel's stall samples were its store; ncu source counters).

Two key loops (P_REGS): P in registers with each product waited for at once (the default, faster), or P through
shared memory with the softmax of block j overlapping the P V of block j - 1. An in-flight P V that reads P from
registers cannot overlap the next softmax: ptxas gives the softmax's results those registers and waits first, or
serialises every wgmma of the kernel when it cannot prove an accumulator complete (C7514). The shared-memory loop
avoids that, but its fence and barriers cost more than the overlap gains.

Measured (H100, `python3 -m bench.gluon_attention`, us a call): batch 2 23.5 (default config; 25.7 with the turns)
against cuDNN 33.5 and Triton 35.4; batch 4 (the twin's second block, two waves) 48.3 against cuDNN 51.8. Loop
(`bench.ab`, one H100): 64.72 ms against 65.22 with cuDNN (the first version, batch 2 only). The same bytes on
every run; within 1.3e-4 of fp32 SDPA, as the Triton kernel (scores in fp32, online softmax in log2 units, P
rounded to fp16, fp32 accumulators, one rounding of the output).

`triton_attention.sdpa` sends the calls it takes here (`preferred`: CNRT_GLUON_ATTENTION, default on, a Hopper GPU,
at most MAX_ROWS query rows), as the operator cnrt::gluon_attention that torch.compile keeps whole.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from engines.torch_fast import pdl
from profiles.config import env_flag

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                    warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # CPU-only installs, or a Triton without Gluon
    gluon = None

BLOCK_D = 64  # the head padded to the MMA's width; the copy engine fills the columns past d with zeros
PRODUCER_REGS = 40  # registers a thread of the producer's warpgroup keeps (setmaxnreg); the consumers get the rest
ROWS = 64  # query rows a consumer: one warpgroup's wgmma M (the Q descriptor's box)
CONSUMERS = 3  # consumer warpgroups a CTA: 192 query rows, so that batch 2 is one wave of 128 CTAs
# (BLOCK_N, STAGES, PINGPONG, P_REGS): keys a block, K/V stages, whether the consumers take turns issuing their
# products (FA3's ping-pong), and P in registers (each product waited for at once) instead of through shared memory
# (the softmax overlapping the previous P V). CNRT_GLUON_ATTENTION_CONFIG overrides the default (A/B measurements);
# CONFIGS are what the bench times.


def _config_from_env() -> "tuple[int, int, int, int]":
    """The default config, or CNRT_GLUON_ATTENTION_CONFIG's 'block_n,stages,pingpong,p_regs'."""
    value = os.environ.get("CNRT_GLUON_ATTENTION_CONFIG", "").strip()
    if not value:
        return 128, 2, 0, 1
    try:
        block_n, stages, pingpong, p_regs = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"CNRT_GLUON_ATTENTION_CONFIG must be 'block_n,stages,pingpong,p_regs', got {value!r}")
    if block_n not in (64, 128) or stages < 2 or pingpong not in (0, 1) or p_regs not in (0, 1):
        raise ValueError(f"CNRT_GLUON_ATTENTION_CONFIG {value!r}: block_n 64 or 128, stages >= 2, flags 0 or 1")
    return block_n, stages, pingpong, p_regs


DEFAULT_CONFIG = _config_from_env()
CONFIGS = ((128, 2, 0, 1), (128, 3, 0, 1), (128, 2, 1, 1), (64, 4, 0, 1), (64, 4, 1, 0))


# On by default (0: cuDNN SDPA, as before the twenty-first session): the self-attentions above triton_attention's
# pair limit (the 32x48 ones) come here, up to MAX_ROWS query rows a call (batch x heads x tokens): since the
# twenty-second session the batch-4 call too (the twin's second block: 48.3 us against cuDNN's 51.8 without the
# turns; with the twin's 16x24 self-attentions on Triton, loop 64.36 against 64.63 ms, one H100).
ENABLED = env_flag("CNRT_GLUON_ATTENTION", True)
MAX_ROWS = int(float(os.environ.get("CNRT_GLUON_ATTENTION_MAX_ROWS", 4 * 8 * 1536)))


def registers() -> "tuple[int, int]":
    """(registers a thread at launch, a consumer's) so that the consumers' warpgroups and the producer's fit the
    SM's 64K registers; setmaxnreg counts are multiples of 8."""
    groups = CONSUMERS + 1
    at_launch = 65536 // (groups * 128) // 8 * 8
    return at_launch, (at_launch * groups - PRODUCER_REGS) // CONSUMERS // 8 * 8


def available() -> bool:
    return gluon is not None


def supports(q: torch.Tensor, k: torch.Tensor, config=DEFAULT_CONFIG) -> bool:
    """Whether `attention` takes these (B, H, T, d) inputs: fp16 on a Hopper GPU, d <= 64 and a multiple of 8,
    T a multiple of the blocks, and each of q, k, v a (B*T, H, d) view (rows of consecutive images follow each
    other) with 16-byte strides, as the step's head-split views of its fused Q/K/V product are."""
    block_m, block_n = ROWS * CONSUMERS, config[0]
    if gluon is None or not q.is_cuda or q.dtype != torch.float16:
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:  # wgmma and setmaxnreg: Hopper only
        return False
    b, h, tq, d = q.shape
    tk = k.shape[2]
    if d > BLOCK_D or d % 8 or tq % block_m or tk % block_n or tk < 2 * block_n or config[1] < 2:
        return False
    return all(_rows_view(t, aligned=False) is not None for t in (q, k))


def preferred(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `triton_attention.sdpa` should send these inputs here: switched on, and taken as they come."""
    return (ENABLED and q.shape[0] * q.shape[1] * q.shape[2] <= MAX_ROWS and k.shape == v.shape and supports(q, k)
            and _rows_view(v, aligned=False) is not None)


def _rows_view(t: torch.Tensor, aligned: bool = True) -> "torch.Tensor | None":
    """(B, H, T, d) -> the same memory as (B*T, H, d), or None if the images' rows are not evenly spaced or a
    stride (with `aligned`, the start too) is not a multiple of 16 bytes. `preferred` leaves the start out: it
    runs while torch.compile traces, where there is no address; the operator checks it."""
    b, h, n, d = t.shape
    sb, sh, st, sd = t.stride()
    if sd != 1 or (b > 1 and sb != n * st) or sh % 8 or st % 8 or (aligned and t.data_ptr() % 16):
        return None
    return t.as_strided((b * n, h, d), (st, sh, 1))


if gluon is not None:

    @gluon.jit
    def _gdc_wait():
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, ready, empty, q_row0, kv_row0, head,
                  n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                  PDL: gl.constexpr):
        """One warp: the CTA's Q rows, then every key block's K and V tiles into the ring of STAGES stages, each
        stage once all consumers have released it (its barriers start as if a use had completed). PDL as
        `pdl.pdl_begin`: the wait comes first (the consumers touch memory only after data this warp loaded), and
        with PDL == 1 (trigger at the start) the next kernel may be scheduled right after it."""
        if PDL:
            _gdc_wait()
            if PDL == 1:
                _gdc_launch_dependents()
        rows: gl.constexpr = q_desc.block_type.shape[0]  # a consumer's (a box's rows must be a power of two)
        mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
        for i in gl.static_range(CONSUMERS):
            tma.async_copy_global_to_shared(q_desc, [q_row0 + rows * i, head, 0], q_bar, q_bufs.index(i))
        for block in range(n_blocks):
            stage = block % STAGES
            mbarrier.wait(empty.index(stage), ((block // STAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + block * BLOCK_N, head, 0], bar, k_bufs.index(stage))
            tma.async_copy_global_to_shared(v_desc, [kv_row0 + block * BLOCK_N, head, 0], bar, v_bufs.index(stage))

    @gluon.jit
    def _softmax(s, m_i, l_i, qk_scale):
        """One block's online softmax in log2 units: the new row maxima, the factor that rescales what came
        before (alpha), the running sums, and P (fp32)."""
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        return m_new, l_i, alpha, p

    @gluon.jit
    def _store_p(p_smem, p):
        """P (fp16) into one of this consumer's shared-memory buffers, visible to the tensor cores' next read."""
        p_smem.store(p.to(gl.float16))
        fence_async_shared()
        gl.thread_barrier()

    @triton.constexpr_function
    def _barrier_asm(arrive, barrier_id):
        return f"bar.{'arrive' if arrive else 'sync'} {barrier_id}, 256; // $0"

    @gluon.jit
    def _named_barrier(ID: gl.constexpr, ARRIVE: gl.constexpr):
        """bar.sync / bar.arrive on named barrier ID for two warpgroups (256 threads): the consumers' turns."""
        gl.inline_asm_elementwise(_barrier_asm(ARRIVE, ID), "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _my_turn(WHICH: gl.constexpr, PINGPONG: gl.constexpr):
        """Wait until the consumer before this one has issued its products (PINGPONG; FA3's warp scheduling)."""
        if PINGPONG:
            _named_barrier(8 + WHICH, False)

    @gluon.jit
    def _pass_turn(WHICH: gl.constexpr, CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
        """Let the next consumer issue its products: its softmax then runs while the tensor cores do ours."""
        if PINGPONG:
            _named_barrier(8 + (WHICH + 1) % CONSUMERS, True)

    @gluon.jit
    def _loop_p_shared(q, k_bufs, v_bufs, p_bufs, q_bar, ready, empty, n_blocks, qk_scale, s_zero, m_i, l_i, acc,
                       WHICH: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, STAGES: gl.constexpr,
                       CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr, o_layout: gl.constexpr,
                       tile_layout: gl.constexpr):
        """The key loop with P through shared memory: in block j its scores and block j - 1's P V (the output first
        rescaled to block j - 1's maxima) go to the tensor cores back to back, and the softmax of block j runs
        while that P V computes. (A P V that read P from registers made ptxas wait for it before the softmax: it
        gives the softmax's results those registers, or serialises every wgmma of the kernel.)"""
        if WHICH == CONSUMERS - 1:  # the first turn is consumer 0's
            _pass_turn(WHICH, CONSUMERS, PINGPONG)
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(ready.index(0), 0)
        k0 = k_bufs.index(0)._reinterpret(gl.float16, [BLOCK_N, BLOCK_D], tile_layout)
        _my_turn(WHICH, PINGPONG)
        s_tok = warpgroup_mma(q, k0.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _pass_turn(WHICH, CONSUMERS, PINGPONG)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
        m_i, l_i, alpha, p = _softmax(s, m_i, l_i, qk_scale)
        _store_p(p_bufs.index(2 * WHICH), p)
        for j in range(1, n_blocks):
            stage = j % STAGES
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            k = k_bufs.index(stage)._reinterpret(gl.float16, [BLOCK_N, BLOCK_D], tile_layout)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            prev = (j - 1) % STAGES
            v = v_bufs.index(prev)._reinterpret(gl.float16, [BLOCK_N, BLOCK_D], tile_layout)
            _my_turn(WHICH, PINGPONG)
            s_tok = warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc_tok = warpgroup_mma(p_bufs.index(2 * WHICH + (j - 1) % 2), v, acc, is_async=True)
            if WHICH != CONSUMERS - 1 or j < n_blocks - 1:  # the last pass would open a turn consumer 0 never takes
                _pass_turn(WHICH, CONSUMERS, PINGPONG)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
            m_i, l_i, alpha, p = _softmax(s, m_i, l_i, qk_scale)
            p_bufs.index(2 * WHICH + j % 2).store(p.to(gl.float16))
            fence_async_shared()
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
            mbarrier.arrive(empty.index(prev), count=1)  # block j - 1's K and V are read
            gl.thread_barrier()  # P is complete for the next P V (Gluon adds two more barriers a block)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        v = v_bufs.index((n_blocks - 1) % STAGES)._reinterpret(gl.float16, [BLOCK_N, BLOCK_D], tile_layout)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(
            warpgroup_mma(p_bufs.index(2 * WHICH + (n_blocks - 1) % 2), v, acc, is_async=True),))
        return acc, l_i

    @gluon.jit
    def _loop_p_registers(q, k_bufs, v_bufs, q_bar, ready, empty, n_blocks, qk_scale, s_zero, m_i, l_i, acc,
                          WHICH: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, STAGES: gl.constexpr,
                          CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr, o_layout: gl.constexpr,
                          tile_layout: gl.constexpr):
        """The key loop with P in registers and no overlap inside a warpgroup: each product is waited for right
        away, and the consumers take turns (PINGPONG) so one's softmax runs while the others' products do."""
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        if WHICH == CONSUMERS - 1:  # the first turn is consumer 0's
            _pass_turn(WHICH, CONSUMERS, PINGPONG)
        mbarrier.wait(q_bar, 0)
        for j in range(n_blocks):
            stage = j % STAGES
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            k = k_bufs.index(stage)._reinterpret(gl.float16, [BLOCK_N, BLOCK_D], tile_layout)
            _my_turn(WHICH, PINGPONG)
            s_tok = warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            _pass_turn(WHICH, CONSUMERS, PINGPONG)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
            m_i, l_i, alpha, p = _softmax(s, m_i, l_i, qk_scale)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p16 = gl.convert_layout(p.to(gl.float16), p_layout)
            v = v_bufs.index(stage)._reinterpret(gl.float16, [BLOCK_N, BLOCK_D], tile_layout)
            _my_turn(WHICH, PINGPONG)
            acc_tok = warpgroup_mma(p16, v, acc, is_async=True)
            if WHICH != CONSUMERS - 1 or j < n_blocks - 1:  # the last pass would open a turn consumer 0 never takes
                _pass_turn(WHICH, CONSUMERS, PINGPONG)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
            mbarrier.arrive(empty.index(stage), count=1)  # block j's K and V are read
        return acc, l_i

    @gluon.jit
    def _consumer(q_bufs, k_bufs, v_bufs, p_bufs, q_bar, ready, empty, o_ptr, HEADS, row0, head, TQ, n_blocks,
                  qk_scale, WHICH: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_D: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr,
                  P_REGS: gl.constexpr, PDL: gl.constexpr):
        """One warpgroup: 64 query rows (the CTA's WHICH-th) over all key blocks (`_loop_p_registers` or
        `_loop_p_shared`), then the normalised rows' store."""
        rows: gl.constexpr = q_bufs.type.shape[1]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_D, 16])
        tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q = q_bufs.index(WHICH)._reinterpret(gl.float16, [rows, BLOCK_D], tile_layout)
        s_zero = gl.zeros([rows, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([rows], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([rows], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([rows, BLOCK_D], gl.float32, o_layout)

        if P_REGS:
            acc, l_i = _loop_p_registers(q, k_bufs, v_bufs, q_bar, ready, empty, n_blocks, qk_scale, s_zero, m_i, l_i,
                                         acc, WHICH, BLOCK_N, BLOCK_D, STAGES, CONSUMERS, PINGPONG, o_layout,
                                         tile_layout)
        else:
            acc, l_i = _loop_p_shared(q, k_bufs, v_bufs, p_bufs, q_bar, ready, empty, n_blocks, qk_scale, s_zero, m_i,
                                      l_i, acc, WHICH, BLOCK_N, BLOCK_D, STAGES, CONSUMERS, PINGPONG, o_layout,
                                      tile_layout)
        if PDL == 2:  # as `pdl.pdl_end`: the next kernel may be scheduled once the main loop is done
            _gdc_launch_dependents()

        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        store_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                                      warps_per_cta=[4, 1], order=[1, 0])
        out = gl.convert_layout(out.to(gl.float16), store_layout)
        r = WHICH * rows + gl.arange(0, rows, layout=gl.SliceLayout(1, store_layout))
        cols = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, store_layout))
        # (B, TQ, H, d) rows: offsets in multiples of the constant HEAD_D, so that the stores are 16-byte vectors
        ptrs = o_ptr + gl.expand_dims(((row0 + r) * HEADS + head) * HEAD_D, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, out, mask=gl.expand_dims(cols < HEAD_D, 0))

    @gluon.jit
    def _attention_kernel(q_desc, k_desc, v_desc, o_ptr, HEADS, TQ, TK, qk_scale,
                          HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                          CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                          PINGPONG: gl.constexpr, P_REGS: gl.constexpr, PDL: gl.constexpr,
                          num_warps: gl.constexpr):
        """One CTA: CONSUMERS x 64 query rows of one (image, head), a producer warp and CONSUMERS warpgroups."""
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0] * CONSUMERS
        BLOCK_D: gl.constexpr = q_desc.block_type.shape[2]
        gl.static_assert(q_desc.block_type.shape[0] == 64)  # a warpgroup's wgmma rows
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // HEADS
        head = pid_bh - b * HEADS
        row0 = b * TQ + pid_m * BLOCK_M
        n_blocks = TK // BLOCK_N
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        # two P buffers a consumer for the shared-memory loop; P_REGS needs none (a token one keeps the signature)
        p_rows: gl.constexpr = 8 if P_REGS else q_desc.block_type.shape[0]
        p_bufs = gl.allocate_shared_memory(gl.float16, [CONSUMERS * 2, p_rows, BLOCK_N], gl.NVMMASharedLayout(
            swizzle_byte_width=min(128, 2 * BLOCK_N), element_bitwidth=16, rank=2))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)

        kv_row0 = b * TK
        # three consumers (two measured slower: 39.5 against 25.7 us at batch 2, as 1.5 waves); warp_specialize takes
        # its partitions' functions and argument tuples inline
        gl.static_assert(CONSUMERS == 3)
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, p_bufs, q_bar, ready, empty, o_ptr, HEADS, row0, head, TQ, n_blocks,
                         qk_scale, 0, HEAD_D, BLOCK_N, BLOCK_D, STAGES, CONSUMERS, PINGPONG, P_REGS, PDL)),
            (_consumer, (q_bufs, k_bufs, v_bufs, p_bufs, q_bar, ready, empty, o_ptr, HEADS, row0, head, TQ, n_blocks,
                         qk_scale, 1, HEAD_D, BLOCK_N, BLOCK_D, STAGES, CONSUMERS, PINGPONG, P_REGS, PDL)),
            (_consumer, (q_bufs, k_bufs, v_bufs, p_bufs, q_bar, ready, empty, o_ptr, HEADS, row0, head, TQ, n_blocks,
                         qk_scale, 2, HEAD_D, BLOCK_N, BLOCK_D, STAGES, CONSUMERS, PINGPONG, P_REGS, PDL)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, ready, empty, row0, kv_row0, head,
                         n_blocks, BLOCK_N, STAGES, CONSUMERS, PDL)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


def _descriptor(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    view = _rows_view(t)
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [rows, 1, BLOCK_D], layout)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, TQ, d), k and v (B, H, TK, d) that `supports` takes; the output
    is (B, H, TQ, d) laid out as (B, TQ, H, d), as `triton_attention.attention`'s."""
    config = config or DEFAULT_CONFIG
    block_n, stages, pingpong, p_regs = config
    if not supports(q, k, config) or _rows_view(v) is None or k.shape != v.shape:
        raise ValueError(f"gluon attention does not take q {tuple(q.shape)} {q.stride()}, k {tuple(k.shape)} "
                         f"{k.stride()}, v {tuple(v.shape)} {v.stride()} with config {config}")
    b, h, tq, d = q.shape
    block_m = ROWS * CONSUMERS
    at_launch, consumer_regs = registers()
    out = torch.empty(b, tq, h, d, device=q.device, dtype=q.dtype)
    _attention_kernel[(tq // block_m, b * h)](
        _descriptor(q, ROWS), _descriptor(k, block_n), _descriptor(v, block_n), out, h, tq, k.shape[2],
        1.0 / math.sqrt(d) / math.log(2), HEAD_D=d, BLOCK_N=block_n, STAGES=stages, CONSUMERS=CONSUMERS,
        CONSUMER_REGS=consumer_regs, PRODUCER_REGS=PRODUCER_REGS, PINGPONG=bool(pingpong), P_REGS=bool(p_regs),
        num_warps=4, maxnreg=at_launch, **pdl.launch_args(q.device))
    return out.transpose(1, 2)


if gluon is not None:

    @torch.library.custom_op("cnrt::gluon_attention", mutates_args=(), device_types="cuda")
    def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`attention` as an operator torch.compile keeps whole. Inputs that arrive in another layout than the
        traced views had are laid out as (B, T, H, d) rows first; cuDNN takes what the kernel cannot."""
        q, k, v = (t if _rows_view(t) is not None else t.transpose(1, 2).contiguous().transpose(1, 2)
                   for t in (q, k, v))
        if not supports(q, k) or _rows_view(q) is None or _rows_view(k) is None:
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous().transpose(1, 2)
        return attention(q, k, v)

    @_attention_op.register_fake
    def _(q, k, v):
        b, h, tq, d = q.shape
        return q.new_empty(b, tq, h, d).transpose(1, 2)

"""`python3 -m bench.gluon_geglu`: GEGLU as a warp-specialized Gluon kernel ("ping-pong"), against the step's kernel.

Why: at the 32x48 and 16x24 levels the Triton GEGLU kernel (`engines/torch_fast/triton_geglu.py`) spends about a
fifth of its time in its epilogue, the exact GELU over the tile, and nothing overlaps it: 60 us of a step's 328
(bench/NOTES.md, seventeenth session). A persistent form in plain Triton was slower. Overlapping the epilogue
with MMAs needs explicit warpgroup control, which Triton 3.6 offers through Gluon. This is the project's first Gluon
kernel. Each CTA runs three partitions:
- a producer warp, which streams (A, W_hidden, W_gate) K tiles by TMA into a ring of shared-memory stages;
- two consumers (a warpgroup or two each), which take the CTA's tiles in turn: even and odd tiles. Each runs its
  tile's wgmma K loop and then the epilogue: biases, exact GELU, store. The K loops take turns (one mbarrier
  each), so one consumer's epilogue can run while the other's MMAs do.
The arithmetic is `triton_geglu`'s: fp32 accumulators over K, then the biases and
`0.5 * g * (1 + erf(g / sqrt 2))` in fp32, rounded once to the input dtype.

Result (H100, seventeenth session): it gives the same bytes as the step's kernel on all seven step shapes, but it
is slower on every one. For example: twin 32x48 38.6-41.7 us against 32.5-32.8; decoder 32x48 22.0-23.7 against
16.7-17.0. That held with 4- or 8-warp consumers, 4 or 6 stages, and one shared ring of stages (the K loops take
turns) or one ring per consumer (no turns).

Eighteenth session: its SASS (`python3 -m bench.sass gluon-geglu-direct-store`) showed the epilogue storing from the
accumulators' layout in 4-byte pieces, where Triton's kernels go through shared memory and store 16-byte vectors.
With that store (config field `coalesced`) it is 3-4 us faster at 32x48 with 6 stages: twin 37.3 against 40.2 us,
decoder 20.7 against 24.0. With 4 stages (now the default config) 34.8 and 19.8, against the Triton kernel's 32.7
and 17.1. Still slower on every shape, so still a probe the step does not use. `compile_sm90` compiles it for an H100 on a machine without a GPU, so changes can be
checked before any device time is spent.
"""

from __future__ import annotations

import sys

import torch

from engines.torch_fast.triton_geglu import output_width

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # CPU-only installs, or a Triton without Gluon
    gluon = None

BLOCK_K = 64
# (BLOCK_M, BLOCK_N, stages): a consumer warpgroup holds two BLOCK_M x BLOCK_N fp32 accumulators
DEFAULT_CONFIG = (128, 64, 4, 4, 1, 1)
# (BLOCK_M, BLOCK_N, stages, warps a consumer, stage rings: 1 shared or 2, store: 1 coalesced or 0 in the
# accumulators' layout)


def registers(consumer_warps: int) -> "tuple[int, int, int]":
    """(registers a thread at launch, a consumer's, the producer's) so that all warpgroups fit 64K registers:
    two consumers of `consumer_warps` warps and the producer's warpgroup; what the producer gives up goes to the
    consumers (setmaxnreg counts are multiples of 8)."""
    groups = 2 * consumer_warps // 4 + 1
    at_launch = 65536 // (groups * 128) // 8 * 8
    producer = 40 if consumer_warps == 4 else 24
    consumer = (at_launch * groups - producer) // (groups - 1) // 8 * 8
    return at_launch, consumer, producer

if gluon is not None:

    @gluon.jit
    def _tile_coords(t, M, tiles_m, tiles_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """Tile t -> (group, row of the group's first A row in the stacked rows, tile row, first output column)."""
        per_group = tiles_m * tiles_n
        g = t // per_group
        r = t % per_group
        pm = r // tiles_n
        return g, g * M + pm * BLOCK_M, pm, (r % tiles_n) * BLOCK_N

    @gluon.jit
    def _slot(local, kk, k_steps, ring, STAGES: gl.constexpr, RINGS: gl.constexpr):
        """(stage index, phase) of K step kk of the CTA's tile number `local`. One ring: the tiles' steps in
        order through all STAGES. Two rings: tile `local` uses ring local % 2 (its consumer's), STAGES / 2 each."""
        per_ring: gl.constexpr = STAGES // RINGS
        it = (local // RINGS) * k_steps + kk
        return ring * per_ring + it % per_ring, (it // per_ring) & 1

    @gluon.jit
    def _producer(a_desc, w_desc, a_bufs, h_bufs, g_bufs, ready, empty, M, N_OUT, K, G,
                  W_KN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                  RINGS: gl.constexpr):
        """One warp: every K step of every tile of this CTA, in order, into the stage ring(s)."""
        stages: gl.constexpr = a_bufs.type.shape[0]
        tiles_m = gl.cdiv(M, BLOCK_M)
        tiles_n = N_OUT // BLOCK_N
        num_tiles = G * tiles_m * tiles_n
        k_steps = K // BLOCK_K
        nbytes: gl.constexpr = a_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes
        local = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            g, row0, pm, n0 = _tile_coords(t, M, tiles_m, tiles_n, BLOCK_M, BLOCK_N)
            for kk in range(k_steps):
                s, phase = _slot(local, kk, k_steps, local % RINGS, stages, RINGS)
                mbarrier.wait(empty.index(s), phase ^ 1)  # barriers start as if phase 1 completed
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                k0 = kk * BLOCK_K
                tma.async_copy_global_to_shared(a_desc, [row0, k0], bar, a_bufs.index(s))
                if W_KN:
                    tma.async_copy_global_to_shared(w_desc, [g * K + k0, n0], bar, h_bufs.index(s))
                    tma.async_copy_global_to_shared(w_desc, [g * K + k0, N_OUT + n0], bar, g_bufs.index(s))
                else:
                    tma.async_copy_global_to_shared(w_desc, [n0, k0], bar, h_bufs.index(s))
                    tma.async_copy_global_to_shared(w_desc, [N_OUT + n0, k0], bar, g_bufs.index(s))
            local += 1

    @gluon.jit
    def _consumer(a_bufs, h_bufs, g_bufs, ready, empty, turn, bias_ptr, out_ptr, M, N_OUT, K, G, s_bg, s_og,
                  s_om, HAS_BIAS: gl.constexpr, W_KN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, WHICH: gl.constexpr, WARPS: gl.constexpr, RINGS: gl.constexpr,
                  COALESCED: gl.constexpr):
        """One warpgroup: the CTA's tiles number WHICH, WHICH + 2, ...: K loop on wgmma, then the GEGLU epilogue.
        The two consumers' K loops take turns (`turn`, one barrier each): a consumer starts its tile's K loop
        when the other has passed the ready barriers of its own, so the stages are consumed in the order the
        producer fills them and no wait can see a stage's phase from two uses back. With two rings (RINGS = 2)
        each consumer has its own stages, consumed in order by it alone, and the K loops need no turns."""
        stages: gl.constexpr = a_bufs.type.shape[0]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        tiles_m = gl.cdiv(M, BLOCK_M)
        tiles_n = N_OUT // BLOCK_N
        num_tiles = G * tiles_m * tiles_n
        k_steps = K // BLOCK_K
        local = 0
        for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            if local % 2 == WHICH:
                if RINGS == 1:
                    mbarrier.wait(turn.index(WHICH), ((local // 2) & 1) ^ (1 - WHICH))  # consumer 0 goes first
                g, row0, pm, n0 = _tile_coords(t, M, tiles_m, tiles_n, BLOCK_M, BLOCK_N)
                acc_h = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
                acc_g = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
                ring = WHICH if RINGS == 2 else 0
                for kk in range(k_steps):
                    s, phase = _slot(local, kk, k_steps, ring, stages, RINGS)
                    mbarrier.wait(ready.index(s), phase)
                    w_h = h_bufs.index(s)
                    w_g = g_bufs.index(s)
                    if not W_KN:  # (BLOCK_N, BLOCK_K) tiles of the Linear weight, read transposed by wgmma
                        w_h = w_h.permute((1, 0))
                        w_g = w_g.permute((1, 0))
                    acc_h = warpgroup_mma(a_bufs.index(s), w_h, acc_h, is_async=True)
                    acc_g = warpgroup_mma(a_bufs.index(s), w_g, acc_g, is_async=True)
                    # the step before this one is done: its stage goes back to the producer
                    acc_h, acc_g = warpgroup_mma_wait(num_outstanding=2, deps=(acc_h, acc_g))
                    s_prev, _ = _slot(local, (kk + k_steps - 1) % k_steps, k_steps, ring, stages, RINGS)
                    mbarrier.arrive(empty.index(s_prev), count=1, pred=kk > 0)
                if RINGS == 1:
                    mbarrier.arrive(turn.index(1 - WHICH), count=1)  # the other consumer's K loop may start
                acc_h, acc_g = warpgroup_mma_wait(num_outstanding=0, deps=(acc_h, acc_g))
                s_last, _ = _slot(local, k_steps - 1, k_steps, ring, stages, RINGS)
                mbarrier.arrive(empty.index(s_last), count=1)
                offs_m = pm * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
                offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
                if HAS_BIAS:
                    b_h = gl.load(bias_ptr + g * s_bg + offs_n).to(gl.float32)
                    b_g = gl.load(bias_ptr + g * s_bg + N_OUT + offs_n).to(gl.float32)
                    acc_h = acc_h + gl.expand_dims(b_h, 0)
                    acc_g = acc_g + gl.expand_dims(b_g, 0)
                out = (acc_h * (0.5 * acc_g * (1.0 + gl.erf(acc_g * 0.7071067811865476)))).to(
                    out_ptr.dtype.element_ty)
                if COALESCED:  # through shared memory into rows of 16-byte vectors, as Triton's kernels store
                    store_layout: gl.constexpr = gl.BlockedLayout(
                        size_per_thread=[1, 8], threads_per_warp=[32 // (BLOCK_N // 8), BLOCK_N // 8],
                        warps_per_cta=[WARPS, 1], order=[1, 0])
                    out = gl.convert_layout(out, store_layout)
                    offs_m = pm * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
                    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_layout))
                ptrs = out_ptr + g * s_og + gl.expand_dims(offs_m, 1) * s_om + gl.expand_dims(offs_n, 0)
                gl.store(ptrs, out, mask=gl.expand_dims(offs_m < M, 1))
            local += 1

    @gluon.jit
    def _geglu_ws_kernel(a_desc, w_desc, bias_ptr, out_ptr, M, N_OUT, K, G, s_bg, s_og, s_om,
                         HAS_BIAS: gl.constexpr, W_KN: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, RINGS: gl.constexpr,
                         COALESCED: gl.constexpr, num_warps: gl.constexpr):
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        h_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        g_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        gl.warp_specialize([
            (_consumer, (a_bufs, h_bufs, g_bufs, ready, empty, turn, bias_ptr, out_ptr, M, N_OUT, K, G, s_bg, s_og,
                         s_om, HAS_BIAS, W_KN, BLOCK_M, BLOCK_N, BLOCK_K, 0, num_warps, RINGS, COALESCED)),
            (_consumer, (a_bufs, h_bufs, g_bufs, ready, empty, turn, bias_ptr, out_ptr, M, N_OUT, K, G, s_bg, s_og,
                         s_om, HAS_BIAS, W_KN, BLOCK_M, BLOCK_N, BLOCK_K, 1, num_warps, RINGS, COALESCED)),
            (_producer, (a_desc, w_desc, a_bufs, h_bufs, g_bufs, ready, empty, M, N_OUT, K, G, W_KN, BLOCK_M,
                         BLOCK_N, BLOCK_K, RINGS)),
        ], [num_warps, 1], [CONSUMER_REGS, PRODUCER_REGS])


def fits_gluon(x: torch.Tensor, weight: torch.Tensor, config=DEFAULT_CONFIG) -> bool:
    """Shapes the kernel tiles: K a multiple of BLOCK_K, the output width of BLOCK_N, fp16 on a Hopper GPU."""
    block_m, block_n = config[:2]
    return (gluon is not None and x.is_cuda and x.dtype == torch.float16 and weight.dtype == torch.float16
            and torch.cuda.get_device_capability(x.device)[0] == 9 and x.shape[-1] % BLOCK_K == 0
            and output_width(weight) % block_n == 0)


def geglu_ws(x: torch.Tensor, weight: torch.Tensor, bias: "torch.Tensor | None",
             config: "tuple[int, int, int, int, int, int]" = DEFAULT_CONFIG) -> torch.Tensor:
    """hidden * gelu(gate) for x (rows.., K) with an nn.Linear weight (2N, K), or x (G, rows, K) with a stacked
    (G, K, 2N) weight; bias (2N,) / (G, 2N) or None. config: (BLOCK_M, BLOCK_N, stages, warps a consumer, rings,
    coalesced): one ring of stages shared by both consumers, whose K loops then take turns, or one ring each
    (stages / 2); the tile stored from the accumulators' layout (0: 2-byte stores) or coalesced through shared
    memory (1: 16-byte stores)."""
    if not fits_gluon(x, weight, config):
        raise ValueError(f"the Gluon GEGLU kernel does not take x {tuple(x.shape)} {x.dtype} with weight "
                         f"{tuple(weight.shape)} {weight.dtype} (config {config})")
    block_m, block_n, stages, warps, rings, coalesced = config
    at_launch, consumer_regs, producer_regs = registers(warps)
    w_kn = weight.dim() == 3
    groups = weight.shape[0] if w_kn else 1
    k, n_out = x.shape[-1], output_width(weight)
    a = x.reshape(groups, -1, k).contiguous()
    m = a.shape[1]
    a_block, w_block = [block_m, BLOCK_K], ([BLOCK_K, block_n] if w_kn else [block_n, BLOCK_K])
    a_desc = TensorDescriptor.from_tensor(a.reshape(groups * m, k), a_block,
                                          gl.NVMMASharedLayout.get_default_for(a_block, gl.float16))
    w2 = weight.contiguous().reshape(groups * k, 2 * n_out) if w_kn else weight.contiguous()
    w_desc = TensorDescriptor.from_tensor(w2, w_block, gl.NVMMASharedLayout.get_default_for(w_block, gl.float16))
    b = None if bias is None else (bias if bias.dim() == 2 else bias[None])
    out = torch.empty(groups, m, n_out, device=x.device, dtype=x.dtype)
    tiles = groups * triton.cdiv(m, block_m) * (n_out // block_n)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    _geglu_ws_kernel[(min(tiles, sms),)](
        a_desc, w_desc, b if b is not None else out, out, m, n_out, k, groups, 0 if b is None else b.stride(0),
        out.stride(0), out.stride(1), HAS_BIAS=b is not None, W_KN=w_kn, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=BLOCK_K, STAGES=stages, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, RINGS=rings,
        COALESCED=bool(coalesced), num_warps=warps, maxnreg=at_launch)
    return out.reshape(*x.shape[:-1], n_out)


def compile_sm90(w_kn: bool, config=DEFAULT_CONFIG, k: int = 320, n_out: int = 1280, rows: int = 256):
    """Compile the kernel for sm90 without a GPU (`bench.sass.compile_sm90`): the CompiledKernel, its PTX and
    cubin. Descriptors are made over CPU tensors only for their types."""
    from bench import sass

    block_m, block_n, stages, warps, rings, coalesced = config
    at_launch, consumer_regs, producer_regs = registers(warps)
    groups = 2 if w_kn else 1
    a = torch.empty(groups * rows, k, dtype=torch.float16)
    w = torch.empty(groups * k, 2 * n_out, dtype=torch.float16) if w_kn else torch.empty(2 * n_out, k,
                                                                                          dtype=torch.float16)
    a_block, w_block = [block_m, BLOCK_K], ([BLOCK_K, block_n] if w_kn else [block_n, BLOCK_K])
    values = dict(a_desc=TensorDescriptor.from_tensor(a, a_block, gl.NVMMASharedLayout.get_default_for(
                      a_block, gl.float16)),
                  w_desc=TensorDescriptor.from_tensor(w, w_block, gl.NVMMASharedLayout.get_default_for(
                      w_block, gl.float16)),
                  bias_ptr=torch.empty(1, dtype=torch.float16), out_ptr=torch.empty(1, dtype=torch.float16),
                  M=rows, N_OUT=n_out, K=k, G=groups, s_bg=2 * n_out, s_og=rows * n_out, s_om=n_out)
    constants = dict(HAS_BIAS=True, W_KN=w_kn, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, STAGES=stages,
                     CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, RINGS=rings,
                     COALESCED=bool(coalesced), num_warps=warps)
    return sass.compile_sm90(_geglu_ws_kernel, values, constants, num_warps=warps, maxnreg=at_launch)


CONFIGS = [(128, 64, 6, 4, 1, 0), (128, 64, 6, 4, 1, 1), (128, 64, 4, 4, 1, 1), (128, 64, 6, 4, 2, 1),
           (128, 64, 4, 8, 2, 1), (64, 128, 4, 4, 2, 1)]


def main() -> int:
    """Per shape (`bench.geglu_kernels.SHAPES`): the step's autotuned Triton kernel, then each Gluon config (its
    error, and whether its bytes equal the Triton kernel's with the biases added in the epilogue, as this probe
    adds them)."""
    from bench.geglu_kernels import SHAPES, _inputs
    from engines.torch_fast import triton_geglu as tg
    from engines.torch_fast.conv_tuning import graph_time_us

    for name, g, m, k, n in SHAPES:
        xs, ws, bs = _inputs(g, m, k, n)
        ref = tg.reference(xs[0].float(), ws[0].float(), bs[0].float())
        step_out = tg.geglu_linear_tma(xs[0], ws[0], bs[0], early_bias=False)
        line = f"{name:8} triton {graph_time_us(lambda i: lambda: tg.geglu_linear_tma(xs[i], ws[i], bs[i])):6.1f} us"
        for cfg in CONFIGS:
            out = geglu_ws(xs[0], ws[0], bs[0], cfg)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            us = graph_time_us(lambda i, c=cfg: lambda: geglu_ws(xs[i], ws[i], bs[i], c))
            line += f" | {cfg} {us:6.1f} us (err {err:.1e}{', same bytes' if torch.equal(out, step_out) else ''})"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

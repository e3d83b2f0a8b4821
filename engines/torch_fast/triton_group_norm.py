"""GroupNorm (+ SiLU) of a channels_last map in ONE kernel that uses the whole GPU: a persistent grid with a grid barrier.

Why: compiled by Inductor, a group norm of the step is two or three kernels (partial statistics, final statistics,
apply), about 5-8 us with their gaps at 256x384, against a few us of memory traffic (bench/NOTES.md). A single kernel
with one program per (image, group) was tried and lost: 64-128 programs cannot use 132 SMs. Here every program
takes a run of pixel rows of one image (all channels), so the grid fills the GPU:

    1. each program reduces its rows to a per-group (mean, M2) pair and stores it;
    2. grid barrier (an arrival counter and a generation word in global memory; the grid never exceeds the SM count,
       so all programs are resident together);
    3. each program combines its image's pairs (Chan's parallel variance, in a fixed order: deterministic) and
       applies (x - mean) * rstd * weight + bias, and SiLU if asked, to its rows, which are still in L2.

Triton's interpreter runs programs one after another, so a barrier there would wait forever: without a GPU the two
halves run as two launches (PHASE 1 and 2) with the same code, which is what the CPU tests check.

`group_norm_nhwc` is what the step calls, as the operator cnrt::group_norm_nhwc (opaque to torch.compile).
Each call site passes its own `site` number: its barrier words are its own, so parts on two streams never share them.
"""

from __future__ import annotations

import os
import torch

from profiles.config import env_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

ENABLED = env_flag("CNRT_TRITON_GROUP_NORM", True)  # 0: Inductor's group norm kernels (A/B measurements)
SUB_TILE_ELEMENTS = 8192  # elements a program holds at once (rows x groups x padded channels per group)
MAX_SITES = 4096  # barrier word pairs in the shared workspace
MAX_PROGRAMS_PER_IMAGE = 128  # the partials of one image are combined as one block
ONE_TILE_ELEMENTS = int(os.environ.get("CNRT_GN_ONE_TILE", "16384"))  # (measurement knobs, see bench.group_norm)
BARRIER = int(os.environ.get("CNRT_GN_BARRIER", "2"))  # 0: two launches, 1: atomics-polled words, 2: one word
MAX_IMAGES = 16  # batch sizes the step hands over (each image needs at least one program per SM's worth)


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


if triton is not None:

    @triton.jit
    def _group_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, sync_ptr,
                           HW, C, ROWS_PER_PROGRAM, PROGRAMS_PER_IMAGE, IMAGES_PER_STACK, eps,
                           GROUPS: tl.constexpr, CPG: tl.constexpr, CPG_PAD: tl.constexpr, SUB: tl.constexpr,
                           Q_PAD: tl.constexpr, SILU: tl.constexpr, PHASE: tl.constexpr, ONE_TILE: tl.constexpr,
                           BARRIER: tl.constexpr):
        """x, y: (images, HW, C) rows; part: (programs, 2, GROUPS) fp32; sync: the site's barrier words (int32).
        PHASE 0: statistics, barrier, apply (GPU); 1: statistics only; 2: apply only (two launches).
        ONE_TILE: a program's rows fit one (SUB, GROUPS, CPG_PAD) tile, kept in registers across the barrier.
        BARRIER 1: arrival counter + generation word, polled by atomics; 2: one word (generation << 16 | count)
        polled by volatile loads."""
        pid = tl.program_id(0)
        image = pid // PROGRAMS_PER_IMAGE
        q = pid - image * PROGRAMS_PER_IMAGE
        row_begin = q * ROWS_PER_PROGRAM
        row_end = tl.minimum(row_begin + ROWS_PER_PROGRAM, HW)
        x_image = x_ptr + image.to(tl.int64) * HW * C
        y_image = y_ptr + image.to(tl.int64) * HW * C
        r = tl.arange(0, SUB)
        g = tl.arange(0, GROUPS)
        j = tl.arange(0, CPG_PAD)
        col = g[:, None] * CPG + j[None, :]  # (GROUPS, CPG_PAD) channel index
        col_ok = (j < CPG)[None, :]
        if PHASE != 2:
            if ONE_TILE:
                rows = row_begin + r
                ok = (rows < row_end)[:, None, None] & col_ok[None, :, :]
                offs = rows[:, None, None] * C + col[None, :, :]
                v = tl.load(x_image + offs, mask=ok, other=0.0).to(tl.float32)
                n_t = ((row_end - row_begin) * CPG).to(tl.float32)
                mean = tl.sum(tl.sum(v, axis=2), axis=0) / n_t
                d = tl.where(ok, v - mean[None, :, None], 0.0)
                m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
            else:
                count = 0.0
                mean = tl.zeros([GROUPS], tl.float32)
                m2 = tl.zeros([GROUPS], tl.float32)
                for r0 in range(row_begin, row_end, SUB):
                    rows = r0 + r
                    ok = (rows < row_end)[:, None, None] & col_ok[None, :, :]
                    v = tl.load(x_image + rows[:, None, None] * C + col[None, :, :], mask=ok,
                                other=0.0).to(tl.float32)
                    n_t = (tl.minimum(row_end - r0, SUB) * CPG).to(tl.float32)
                    mean_t = tl.sum(tl.sum(v, axis=2), axis=0) / n_t
                    d = tl.where(ok, v - mean_t[None, :, None], 0.0)
                    m2_t = tl.sum(tl.sum(d * d, axis=2), axis=0)
                    total = count + n_t  # Chan et al.: merge (count, mean, m2) with the sub-tile's
                    delta = mean_t - mean
                    mean = mean + delta * (n_t / total)
                    m2 = m2 + m2_t + delta * delta * (count * n_t / total)
                    count = total
            tl.store(part_ptr + pid * 2 * GROUPS + g, mean)
            tl.store(part_ptr + pid * 2 * GROUPS + GROUPS + g, m2)
        if PHASE == 0:
            tl.debug_barrier()  # every thread's partials are stored before the arrival
            if BARRIER == 1:  # the last program to arrive resets the counter and bumps the generation
                generation = tl.atomic_add(sync_ptr + 1, 0, sem="relaxed")
                arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
                if arrived == tl.num_programs(0) - 1:
                    tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
                    tl.atomic_add(sync_ptr + 1, 1, sem="release")
                else:
                    current = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
                    while current == generation:
                        current = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
            else:  # one word: the last arrival turns count = programs - 1 into 0 and adds 1 to the generation
                old = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
                if (old & 0xFFFF) == tl.num_programs(0) - 1:
                    tl.atomic_add(sync_ptr, 0x10000 - tl.num_programs(0), sem="release")
                else:
                    current = tl.load(sync_ptr, volatile=True)
                    while (current >> 16) == (old >> 16):
                        current = tl.load(sync_ptr, volatile=True)
                    tl.atomic_add(sync_ptr, 0, sem="acquire")  # orders the partials' loads after the barrier
            tl.debug_barrier()
        if PHASE != 1:
            qs = tl.arange(0, Q_PAD)
            q_ok = qs < PROGRAMS_PER_IMAGE
            n_q = (tl.minimum(tl.maximum(HW - qs * ROWS_PER_PROGRAM, 0), ROWS_PER_PROGRAM) * CPG).to(tl.float32)
            n_q = tl.where(q_ok, n_q, 0.0)
            parts = part_ptr + (image * PROGRAMS_PER_IMAGE + qs)[:, None] * 2 * GROUPS + g[None, :]
            means = tl.load(parts, mask=q_ok[:, None], other=0.0, volatile=True)
            m2s = tl.load(parts + GROUPS, mask=q_ok[:, None], other=0.0, volatile=True)
            n_all = (HW * CPG).to(tl.float32)
            mean = tl.sum(means * n_q[:, None], axis=0) / n_all
            spread = means - mean[None, :]
            m2 = tl.sum(m2s, axis=0) + tl.sum(spread * spread * n_q[:, None], axis=0)
            rstd = tl.rsqrt(m2 / n_all + eps)
            stack = image // IMAGES_PER_STACK
            w = tl.load(w_ptr + stack * C + col, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + stack * C + col, mask=col_ok, other=0.0).to(tl.float32)
            scale = rstd[:, None] * w
            shift = b - mean[:, None] * scale
            if ONE_TILE and PHASE == 0:
                out = v * scale[None, :, :] + shift[None, :, :]
                if SILU:
                    out = out * tl.sigmoid(out)
                tl.store(y_image + offs, out.to(y_ptr.dtype.element_ty), mask=ok)
            else:
                for r0 in range(row_begin, row_end, SUB):
                    rows = r0 + r
                    ok = (rows < row_end)[:, None, None] & col_ok[None, :, :]
                    offs = rows[:, None, None] * C + col[None, :, :]
                    v = tl.load(x_image + offs, mask=ok, other=0.0).to(tl.float32)
                    out = v * scale[None, :, :] + shift[None, :, :]
                    if SILU:
                        out = out * tl.sigmoid(out)
                    tl.store(y_image + offs, out.to(y_ptr.dtype.element_ty), mask=ok)


_workspaces: dict = {}
_next_site = [0]


def new_site() -> int:
    """A call-site number for `group_norm_nhwc`: each site gets its own barrier words."""
    site = _next_site[0] % MAX_SITES
    _next_site[0] += 1
    return site


def _sync_words(device: torch.device, site: int) -> torch.Tensor:
    """The two int32 barrier words of `site` on `device`. The workspace is made (zeroed) on a device's first call,
    which the runner makes in warm-up, before any CUDA-graph capture."""
    key = (device.type, device.index)
    if key not in _workspaces:
        _workspaces[key] = torch.zeros(MAX_SITES, 2, dtype=torch.int32, device=device)
    return _workspaces[key][site]


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def plan(images: int, hw: int, channels: int, groups: int, max_programs: int,
         tile_elements: int = SUB_TILE_ELEMENTS, one_tile_elements: int = 0) -> dict:
    """How a (images, hw, channels) map is split: padded channels per group, sub-tile rows, rows per program and
    programs per image (at most max_programs in all, so every program is resident for the barrier). With
    one_tile_elements, a program whose rows fit that many (padded) elements holds them as one tile."""
    cpg = channels // groups
    cpg_pad = _pow2_at_least(cpg)
    row_elements = _pow2_at_least(groups) * cpg_pad
    per_image = max(1, min(max_programs // images, MAX_PROGRAMS_PER_IMAGE))
    rows = -(-hw // per_image)
    one_tile = _pow2_at_least(rows) * row_elements <= one_tile_elements
    if one_tile:
        sub = _pow2_at_least(rows)
    else:
        sub = min(max(1, tile_elements // row_elements), _pow2_at_least(hw))
        rows = -(-rows // sub) * sub  # whole sub-tiles per program
    programs_per_image = -(-hw // rows)
    return {"cpg": cpg, "cpg_pad": cpg_pad, "sub": sub, "rows_per_program": rows, "one_tile": one_tile,
            "programs_per_image": programs_per_image, "q_pad": _pow2_at_least(programs_per_image)}


def fits(x: torch.Tensor, groups: int, max_programs: int = 132) -> bool:
    """Shapes the kernel takes: a 4-D channels_last map, power-of-two group count, one image per <= max_programs
    programs, and a row of all groups within a sub-tile."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return False
    b, c, _, _ = x.shape
    return (c % groups == 0 and groups & (groups - 1) == 0 and 0 < b <= max_programs
            and groups * _pow2_at_least(c // groups) <= SUB_TILE_ELEMENTS)


def group_norm_nhwc(x: torch.Tensor, groups: int, eps: float, weight: torch.Tensor, bias: torch.Tensor,
                    silu: bool, site: int = 0) -> torch.Tensor:
    """group_norm(x) * weight + bias (then SiLU if silu) of a channels_last (B, C, H, W) map, in x's dtype.
    weight / bias: (C,), or stacked (A, C) for a batch of A equal runs of images (the twin's two networks)."""
    if not fits(x, groups, 1 << 30):
        raise ValueError(f"group_norm_nhwc needs a channels_last 4-D map with C divisible by a power-of-two group "
                         f"count, got shape {tuple(x.shape)}, groups {groups}")
    b, c, h, w = x.shape
    stacks = weight.numel() // c
    if weight.numel() != stacks * c or bias.numel() != weight.numel() or b % stacks:
        raise ValueError(f"weight / bias must be (C,) or (A, C) with A dividing the batch; got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)} for C={c}, B={b}")
    p = plan(b, h * w, c, groups, _max_programs(x.device), one_tile_elements=ONE_TILE_ELEMENTS)
    grid = (b * p["programs_per_image"],)
    if grid[0] > _max_programs(x.device) and not _interpreted():
        raise ValueError(f"{b} images need {grid[0]} programs, more than the GPU's {_max_programs(x.device)} SMs")
    y = torch.empty_like(x)
    part = torch.empty(grid[0], 2, groups, device=x.device, dtype=torch.float32)
    weight, bias = weight.contiguous(), bias.contiguous()
    elements = p["sub"] * _pow2_at_least(groups) * p["cpg_pad"]
    args = dict(GROUPS=groups, CPG=p["cpg"], CPG_PAD=p["cpg_pad"], SUB=p["sub"], Q_PAD=p["q_pad"], SILU=silu,
                ONE_TILE=p["one_tile"], BARRIER=BARRIER,
                num_warps=16 if elements > 8192 else 8 if elements >= 4096 else 4)
    common = (x, weight, bias, y, part)
    sizes = (h * w, c, p["rows_per_program"], p["programs_per_image"], b // stacks, eps)
    if _interpreted() or BARRIER == 0:
        sync = x  # not read
        _group_norm_kernel[grid](*common, sync, *sizes, PHASE=1, **args)
        _group_norm_kernel[grid](*common, sync, *sizes, PHASE=2, **args)
    else:
        _group_norm_kernel[grid](*common, _sync_words(x.device, site), *sizes, PHASE=0, **args)
    return y


def reference(x: torch.Tensor, groups: int, eps: float, weight: torch.Tensor, bias: torch.Tensor,
              silu: bool) -> torch.Tensor:
    """The same result in torch (fp32 arithmetic, one rounding): the CPU path and the kernel's reference."""
    b, c = x.shape[:2]
    stacks = weight.numel() // c
    y = torch.nn.functional.group_norm(x.float(), groups, eps=eps)
    shape = (stacks, -1, c, 1, 1)
    y = (y.reshape(stacks, -1, *x.shape[1:]) * weight.float().reshape(shape)
         + bias.float().reshape(shape)).reshape(x.shape)
    if silu:
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)


if triton is not None:

    @torch.library.custom_op("cnrt::group_norm_nhwc", mutates_args=(), device_types="cuda")
    def _group_norm_op(x: torch.Tensor, groups: int, eps: float, weight: torch.Tensor, bias: torch.Tensor,
                       silu: bool, site: int) -> torch.Tensor:
        return group_norm_nhwc(x, groups, eps, weight, bias, silu, site)

    @_group_norm_op.register_fake
    def _(x, groups, eps, weight, bias, silu, site):
        return torch.empty_like(x, memory_format=torch.channels_last)


def usable(x: torch.Tensor, groups: int) -> bool:
    """Whether the step should run this kernel for x: enabled, Triton present, on CUDA, and a shape it takes.
    (Tensor metadata only, so torch.compile can decide it while tracing.)"""
    return ENABLED and triton is not None and x.is_cuda and fits(x, groups, MAX_IMAGES)

"""`python3 -m bench.norm_matmul`: the folded LayerNorm + GEMM kernel against the step's norm kernel + GEMM, per shape.

For every (LayerNorm -> linear) pair of the step (fused Q/K/V, cross-attention query, GEGLU; decoder and twin
encoder, each level) this times, in a CUDA graph over rotating inputs as the conv tuner times:
- what the step runs without the kernel: Inductor's LayerNorm (of x + shift) and then cuBLAS (`F.linear` / `bmm`),
  or for GEGLU the step's Triton GEGLU GEMM (`triton_geglu`), compiled together with torch.compile;
- `norm_matmul.norm_matmul_kernel` on the folded weights (`NormLinear`), autotuned per shape (the config it picks
  is printed),
and checks the kernel against LayerNorm + linear in fp32.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from engines.torch_fast import norm_matmul as nm
from engines.torch_fast import triton_geglu
from engines.torch_fast.conv_tuning import graph_time_us

# (name, groups (0: nn.Linear-layout weight), rows a group, K, output width, GEGLU)
SHAPES = [
    ("dec 32x48 qkv", 0, 3072, 320, 960, False), ("dec 32x48 q", 0, 3072, 320, 320, False),
    ("dec 32x48 geglu", 0, 3072, 320, 1280, True),
    ("dec 16x24 qkv", 0, 768, 640, 1920, False), ("dec 16x24 q", 0, 768, 640, 640, False),
    ("dec 16x24 geglu", 0, 768, 640, 2560, True),
    ("dec 8x12 qkv", 0, 192, 1280, 3840, False), ("dec 8x12 q", 0, 192, 1280, 1280, False),
    ("dec 8x12 geglu", 0, 192, 1280, 5120, True),
    ("twin 32x48 qkv (one copy)", 2, 1536, 320, 960, False), ("twin 32x48 qkv", 2, 3072, 320, 960, False),
    ("twin 32x48 q (one copy)", 2, 1536, 320, 320, False), ("twin 32x48 q", 2, 3072, 320, 320, False),
    ("twin 32x48 geglu", 2, 3072, 320, 1280, True),
    ("twin 16x24 qkv", 2, 768, 640, 1920, False), ("twin 16x24 geglu", 2, 768, 640, 2560, True),
    ("twin 8x12 qkv", 2, 192, 1280, 3840, False), ("twin 8x12 geglu", 2, 192, 1280, 5120, True),
    ("twin 4x6 qkv", 2, 48, 1280, 3840, False), ("twin 4x6 geglu", 2, 48, 1280, 5120, True),
]
COPIES = 3
EPS = 1e-5


def _inputs(groups: int, rows: int, k: int, n: int, geglu: bool, gen: torch.Generator) -> tuple:
    dev = torch.device("cuda")
    g = max(groups, 1)
    width = 2 * n if geglu else n
    x = torch.randn(*((rows, k) if groups == 0 else (g, rows, k)), device=dev, generator=gen).half()
    w = ((torch.randn(width, k, device=dev, generator=gen) / k ** 0.5).half() if groups == 0
         else (torch.randn(g, k, width, device=dev, generator=gen) / k ** 0.5).half())
    vec = (k,) if groups == 0 else (g, k)
    nw, nb, sh = (torch.randn(*vec, device=dev, generator=gen).half() for _ in range(3))
    b = (torch.randn(*((width,) if groups == 0 else (g, width)), device=dev, generator=gen).half()
         if geglu else None)
    return x, w, nw, nb, sh, b


def _unfused(x, w, nw, nb, sh, b, geglu: bool, reference: bool = False):
    """The step's form: the norm's own kernel, then the GEMM (cuBLAS, or the Triton GEGLU operator); reference:
    the same in torch (fp32 inputs)."""
    def ff(normed):
        return (triton_geglu.reference if reference else triton_geglu.geglu)(normed, w, b)

    if w.dim() == 2:
        normed = F.layer_norm(x + sh, (x.shape[-1],), nw, nb, EPS)
        return ff(normed) if geglu else F.linear(normed, w)
    normed = F.layer_norm(x + sh[:, None, :], (x.shape[-1],), eps=EPS) * nw[:, None, :] + nb[:, None, :]
    return ff(normed) if geglu else torch.bmm(normed, w)


def main() -> int:
    gen = torch.Generator("cuda").manual_seed(0)
    total_base = total_kernel = 0.0
    for name, groups, rows, k, n, geglu in SHAPES:
        sets = [_inputs(groups, rows, k, n, geglu, gen) for _ in range(COPIES)]
        x, w, nw, nb, sh, b = sets[0]
        torch._dynamo.reset()  # one lambda per shape, the same code object: no recompile limit across shapes
        unfused = torch.compile(lambda *a, _g=geglu: _unfused(*a, _g), fullgraph=True, dynamic=False)
        ref = _unfused(x.float(), w.float(), nw.float(), nb.float(), sh.float(), None if b is None else b.float(),
                       geglu, reference=True)
        layers = [nm.NormLinear(*s[2:4], EPS, s[1], s[5], s[4], geglu) for s in sets]
        base = graph_time_us(lambda i: lambda: unfused(*sets[i]), copies=COPIES)
        try:
            def given(i):  # (mean, rstd) per row of x + shift, for the STATS=2 lower bound
                xs = sets[i][0].float().reshape(max(groups, 1), -1, k) + sets[i][4].float().reshape(-1, 1, k)
                var, mean = torch.var_mean(xs, dim=-1, correction=0)
                return torch.stack([mean, torch.rsqrt(var + EPS)], dim=-1).contiguous()

            stats_given = [given(i) for i in range(COPIES)]

            def call(i, mode=0):
                layer = layers[i]
                return lambda: nm.norm_matmul_kernel(sets[i][0], layer.weight, layer.u, layer.v, EPS, layer.shift,
                                                     layer.c, geglu, stats=mode, given=stats_given[i])

            got = call(0)()
            err = (got.float() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
            us = graph_time_us(call, copies=COPIES)
            best = getattr(nm._norm_matmul_tuned, "best_config", None)
            extra = []
            for mode in (1, 2):
                got = call(0, mode)()
                bad = (got.float() - ref).abs().max().item() / max(1.0, ref.abs().max().item()) > 1e-2
                extra.append(f"{graph_time_us(lambda i, _m=mode: call(i, _m), copies=COPIES):.1f}"
                             + (" (wrong)" if bad else ""))
        except Exception as e:  # noqa: BLE001 - report and go on with the other shapes
            print(f"{name}: norm + GEMM {base:.1f} us, kernel failed: {type(e).__name__}: {e}"[:300], flush=True)
            continue
        total_base += base
        total_kernel += us
        cfg = "" if best is None else (f"{best.kwargs['BLOCK_M']}x{best.kwargs['BLOCK_N']} w{best.num_warps} "
                                       f"s{best.num_stages}")
        print(f"{name:28s} norm + GEMM {base:6.1f} us   one kernel {us:6.1f} us   ({cfg}; rel. error {err:.1e})"
              f"   stats by pointers {extra[0]}, stats given {extra[1]}", flush=True)
    print(f"sum over the shapes above: {total_base:.1f} -> {total_kernel:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python3 -m bench.cudnn_frontend_sdpa`: every cuDNN graph-API plan for the step's long self-attentions.

Why: torch's cuDNN attention (aten/src/ATen/native/cudnn/MHA.cpp) builds its graph with heuristics mode A and runs
the first plan. In the captured loop each of those calls is a memset, about 4.5 us of idle GPU and the kernel (about
50 us a step of overhead over 7 calls, bench/NOTES.md). The convolutions had faster configs further down cuDNN's list
(session 15); this sweeps the attention's the same way: for each shape, each implementation the package names and
each plan, it checks the output against F.scaled_dot_product_attention, times the call in a CUDA graph over rotating
inputs (`conv_tuning.graph_time_us`) and lists the kernels one call launches (a memset shows up there).

Q, K and V are laid out as the step lays them out: (B, H, T, d) head-split views of (B, T, H * d) rows.

Result (H100, session 16, bench/NOTES.md): every implementation (AUTO, COMPOSITE, UNIFIED) offers the same two
kernels for all three shapes: the sm90 one torch already runs (with its memset; 50.8 / 33.6 / 11.4 us) and an sm80
one without a memset that takes 1.3-1.7x as long. No plan to switch to.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from engines.torch_fast.conv_tuning import graph_time_us

# (batch, heads, tokens, head size): the twin's and the decoder's 32x48 self-attentions, the twin's at 16x24
SHAPES = ((4, 8, 1536, 40), (2, 8, 1536, 40), (4, 8, 384, 80))


def _rows(b: int, h: int, t: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(b, t, h * d, device="cuda", dtype=torch.half, generator=gen)
    return x.view(b, t, h, d).transpose(1, 2)


def _kernels(call) -> list[str]:
    """Names of the GPU activities one call launches (kernels and memsets), in order."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def sweep(cudnn, handle, shape, max_plans: int) -> list[dict]:
    b, h, t, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    qs, ks, vs = ([_rows(b, h, t, d, gen) for _ in range(3)] for _ in range(3))
    ref = F.scaled_dot_product_attention(qs[0], ks[0], vs[0]).float()
    rows = [{"plan": "torch F.scaled_dot_product_attention",
             "us": graph_time_us(lambda i: lambda: F.scaled_dot_product_attention(qs[i], ks[i], vs[i])),
             "kernels": _kernels(lambda: F.scaled_dot_product_attention(qs[0], ks[0], vs[0]))}]
    impls = getattr(cudnn, "attention_implementation", None)
    for impl in [None] + ([] if impls is None else list(impls.__members__.values())):
        g = cudnn.pygraph(io_data_type=cudnn.data_type.HALF, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        tq, tk, tv = (g.tensor(name=n, dim=list(x.shape), stride=list(x.stride()), data_type=cudnn.data_type.HALF)
                      for n, x in (("Q", qs[0]), ("K", ks[0]), ("V", vs[0])))
        out = torch.empty_like(qs[0])
        kwargs = {} if impl is None else {"implementation": impl}
        try:
            to, _ = g.sdpa(q=tq, k=tk, v=tv, is_inference=True, attn_scale=1.0 / math.sqrt(d), name="sdpa", **kwargs)
            to.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride()))
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
            g.check_support()
        except Exception as e:  # noqa: BLE001  (an implementation this GPU or shape does not support)
            rows.append({"plan": f"implementation {impl}", "error": str(e)[:120]})
            continue
        for i in range(min(g.get_execution_plan_count(), max_plans)):
            name = f"{impl} {g.get_plan_name_at_index(i)}"
            try:
                g.build_plan_at_index(i)
                ws = torch.empty(max(g.get_workspace_size_plan_at_index(i), 1), device="cuda", dtype=torch.uint8)
            except Exception as e:  # noqa: BLE001
                rows.append({"plan": name, "error": str(e)[:120]})
                continue

            def call(j, i=i, ws=ws):
                def run():
                    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
                    g.execute_plan_at_index({tq: qs[j], tk: ks[j], tv: vs[j], to: out}, ws, i, handle=handle)
                return run
            call(0)()
            torch.cuda.synchronize()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append({"plan": name, "rel_err": err, "us": graph_time_us(call) if err < 2e-3 else float("nan"),
                         "kernels": _kernels(call(0))})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--max-plans", type=int, default=32, help="at most this many plans per implementation")
    a = p.parse_args(argv)
    try:
        import cudnn  # nvidia-cudnn-frontend
    except ImportError:
        print("needs the nvidia-cudnn-frontend package", flush=True)
        return 1
    handle = cudnn.create_handle()
    for shape in SHAPES:
        print(f"== B, H, T, d = {shape}", flush=True)
        for row in sweep(cudnn, handle, shape, a.max_plans):
            if "error" in row:
                print(f"  {row['plan']}: {row['error']}", flush=True)
                continue
            kernels = ", ".join(k[:40] for k in row["kernels"])
            print(f"  {row['us']:7.1f} us  err {row.get('rel_err', 0):.1e}  {row['plan']}  [{kernels}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

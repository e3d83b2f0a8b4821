"""`python3 -m bench`: one process, one GPU, every figure a ratio against baselines timed in the same run.

Rows: fp32 eager reference (two calls per step, as ddim_hacked), diffusers fp16 eager, diffusers fp16 +
channels_last + one CUDA graph, diffusers + torch.compile + one CUDA graph, and ours (loop; stages; end-to-end
process()). Fidelity of ours and of diffusers fp16 eager against the fp32 reference over the test images
(PSNR, max abs, latent relative error). JSON rows + a PNG bar chart under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.diffusers_baseline import DiffusersLoop
from bench.timing import time_cuda, time_wall
from graph_capture import GraphedFunction
from models import load_bundle
from models.step import FusedDenoiseStep, LatentDecoder
from pipeline.preprocess import canny_edges, edges_to_hint
from pipeline.runtime import REPO_ROOT, Canny2ImageRuntime, RuntimeConfig
from profiles.config import get_profile, reference_of

PROMPT = ("a bird", "best quality, extremely detailed", "longbody, lowres, bad anatomy, bad hands, missing fingers")
SEED = 2946901


@dataclass
class BenchConfig:
    weights: str
    profile: str
    num_images: int
    runs: int
    compile_mode: str
    skip_compiled_baseline: bool
    skip_reference: bool
    out: Path


@dataclass
class Row:
    name: str
    loop_ms: float | None = None
    end_to_end_ms: float | None = None
    compile_s: float | None = None
    peak_mem_gib: float | None = None
    tflops: float | None = None
    psnr_db: float | None = None
    min_psnr_db: float | None = None
    max_abs: int | None = None
    latent_rel_err: float | None = None
    extra: dict = field(default_factory=dict)


def parse_args(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    p.add_argument("--weights", default="synthetic")
    p.add_argument("--profile", default="256x384-fp16")
    p.add_argument("--num-images", type=int, default=20)
    p.add_argument("--runs", type=int, default=10, help="timed repetitions per measurement (median reported)")
    p.add_argument("--compile-mode", default="auto", choices=["auto", "aoti", "jit", "eager"])
    p.add_argument("--skip-compiled-baseline", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "bench")
    a = p.parse_args(argv)
    return BenchConfig(a.weights, a.profile, a.num_images, a.runs, a.compile_mode, a.skip_compiled_baseline,
                       a.skip_reference, a.out)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def fidelity(row: Row, images: list[np.ndarray], ref_images: list[np.ndarray], latents, ref_latents) -> None:
    values = [psnr(a, b) for a, b in zip(images, ref_images)]
    row.psnr_db = float(np.mean(values))
    row.min_psnr_db = float(np.min(values))
    row.max_abs = int(max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(images, ref_images)))
    row.latent_rel_err = float(np.mean([((l - r).norm() / r.norm()).item() for l, r in zip(latents, ref_latents)]))


def flops_per_loop(bundle, profile, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    step = FusedDenoiseStep(bundle.unet, bundle.controlnet)
    b, c, h, w = profile.latent_shape
    args = (torch.randn(b, c, h, w, device=device), torch.tensor([951.0], device=device),
            torch.ones(4, device=device), torch.randn(2 * b, 77, bundle.context_dim, device=device),
            torch.randn(b, bundle.controlnet.config.block_out_channels[0], h, w, device=device),
            torch.ones(1, device=device), torch.ones(2, 13, device=device))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step(*args)
    return counter.get_total_flops() * profile.ddim_steps


class Workload:
    """Test images -> edge maps and float hints, the prompt's context and the seeded initial noise, computed once."""

    def __init__(self, cfg: BenchConfig, profile, device):
        from scoring.images import load_test_images

        self.images = load_test_images(cfg.num_images, cache_root=REPO_ROOT / "build" / "test_images",
                                       height=profile.height,
                                       width=profile.width)
        self.edges = [torch.from_numpy(canny_edges(im.bgr, min(profile.height, profile.width), 100, 200)).to(device)
                      for im in self.images]
        self.hints = [edges_to_hint(e, 1) for e in self.edges]  # = canny_hint's float hint (tests/test_inputs.py)
        torch.manual_seed(SEED)
        self.x_T = torch.randn(profile.latent_shape, device=device)


def run_ours(cfg, work, profile) -> tuple[Row, list, list, object]:
    t0 = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    rt = Canny2ImageRuntime(RuntimeConfig(weights=cfg.weights, profile=cfg.profile, backend="torch",
                                          compile_mode=cfg.compile_mode))
    args = lambda im: (im.bgr, *PROMPT, 1, min(profile.height, profile.width), profile.ddim_steps, False, 1, 9,  # noqa: E731
                       SEED, 0.0, 100, 200)
    rt.process(*args(work.images[0]))  # builds / compiles / captures
    row = Row(f"ours: {rt.engines.description}", compile_s=time.perf_counter() - t0)
    log(f"ours ready in {row.compile_s:.1f} s: {rt.description}")
    e2e = time_wall(lambda: rt.process(*args(work.images[0])), warmup=2, runs=cfg.runs)
    row.end_to_end_ms = e2e.median_ms
    row.loop_ms = time_cuda(lambda: rt.loop(work.x_T), runs=cfg.runs).median_ms
    from models.tokenizer import tokenize

    ids = tokenize([PROMPT[0]] * 1 + [PROMPT[2]]).to(rt.device)
    row.extra = {
        "text_uncached_ms": time_cuda(lambda: rt.engines.text(ids), runs=cfg.runs).median_ms,
        "hint_ms": time_cuda(lambda: rt.hint_stage(work.edges[0]), runs=cfg.runs).median_ms,
        "decode_ms": time_cuda(lambda: rt.decode_stage(work.x_T), runs=cfg.runs).median_ms,
        "process_min_ms": e2e.min_ms,
        "process_max_ms": e2e.max_ms,
    }
    images, latents = [], []
    for im in work.images:
        images.append(rt.process(*args(im))[0])
    # latents of the loop itself for the latent error (same noise / hint path as the reference)
    for edges in work.edges:
        context = rt.prompts.get(PROMPT[0] + ", " + PROMPT[1], PROMPT[2], 1)
        rt.engines.step.prepare(context, rt.hint_stage(edges).clone(), 9.0, torch.ones(2, 13))
        latents.append(rt.loop(work.x_T).float().cpu())
    row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    return row, images, latents, rt


def run_reference(cfg, work, profile) -> tuple[Row, list, list]:
    rt = Canny2ImageRuntime(RuntimeConfig(weights=cfg.weights, profile=reference_of(profile).name, backend="torch"))
    torch.cuda.reset_peak_memory_stats()
    row = Row("fp32 eager reference (diffusers modules, cond/uncond calls as ddim_hacked)")
    context = rt.prompts.get(PROMPT[0] + ", " + PROMPT[1], PROMPT[2], 1)
    images, latents = [], []
    with torch.no_grad():
        for hint in work.hints:  # = process() for the seeded noise, without a second loop for the latent
            rt.engines.step.prepare(context, rt.engines.hint(hint), 9.0, torch.ones(2, 13))
            latent = rt.loop(work.x_T)
            latents.append(latent.float().cpu())
            images.append(rt.engines.decode(latent)[0].cpu().numpy())
    row.loop_ms = time_cuda(lambda: rt.loop(work.x_T), warmup=1, runs=max(2, cfg.runs // 4)).median_ms
    row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    del rt
    torch.cuda.empty_cache()
    return row, images, latents


def run_diffusers(cfg, work, bundle, profile, device, ref_context) -> list[tuple[Row, list, list]]:
    """fp16 eager, fp16 + channels_last + CUDA graph, torch.compile + CUDA graph (all batch-2 CFG)."""
    results = []
    fp16 = copy.deepcopy(bundle).to(device=device, dtype=torch.float16)
    decoder = LatentDecoder(fp16.vae)
    context = ref_context.to(device)

    def images_of(loop_fn):
        imgs, lats = [], []
        for hint in work.hints:
            lat = loop_fn(work.x_T, hint, context).float()
            lats.append(lat.cpu())
            imgs.append(decoder(lat)[0].cpu().numpy())
        return imgs, lats

    with torch.no_grad():
        loop = DiffusersLoop(fp16.unet, fp16.controlnet, profile.ddim_steps, 9.0, device)
        torch.cuda.reset_peak_memory_stats()
        row = Row("diffusers fp16 eager (batch-2 CFG)")
        row.loop_ms = time_cuda(lambda: loop(work.x_T, work.hints[0], context), warmup=1, runs=3).median_ms
        imgs, lats = images_of(loop)
        row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
        results.append((row, imgs, lats))
        log(f"{row.name}: {row.loop_ms:.1f} ms")

        for net in (fp16.unet, fp16.controlnet):
            net.to(memory_format=torch.channels_last)
        graphed = GraphedFunction(loop, "diffusers loop", warmup_iters=1)
        torch.cuda.reset_peak_memory_stats()
        row = Row("diffusers fp16 + channels_last + one CUDA graph")
        row.loop_ms = time_cuda(lambda: graphed(work.x_T, work.hints[0], context), runs=cfg.runs).median_ms
        row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
        results.append((row, None, None))
        log(f"{row.name}: {row.loop_ms:.1f} ms")
        del graphed

        if not cfg.skip_compiled_baseline:
            t0 = time.perf_counter()
            loop.unet = torch.compile(fp16.unet, fullgraph=True)
            loop.controlnet = torch.compile(fp16.controlnet, fullgraph=True)
            graphed = GraphedFunction(loop, "compiled diffusers loop", warmup_iters=2)
            torch.cuda.reset_peak_memory_stats()
            graphed(work.x_T, work.hints[0], context)
            torch.cuda.synchronize()
            row = Row("diffusers + torch.compile(fullgraph) + channels_last + one CUDA graph",
                      compile_s=time.perf_counter() - t0)
            row.loop_ms = time_cuda(lambda: graphed(work.x_T, work.hints[0], context), runs=cfg.runs).median_ms
            row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
            results.append((row, None, None))
            log(f"{row.name}: {row.loop_ms:.1f} ms (compile {row.compile_s:.0f} s)")
            del graphed
    del fp16, loop, decoder
    torch.cuda.empty_cache()
    return results


def header(profile) -> dict:
    import importlib.metadata as md

    props = torch.cuda.get_device_properties(0)
    versions = {}
    for name in ("torch", "diffusers", "transformers", "triton"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {"gpu": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda, "versions": versions, "profile": profile.name,
            "command": " ".join(["python3 -m bench", *sys.argv[1:]])}


def write_outputs(cfg, head, rows: list[Row]) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "bench.json").write_text(json.dumps({"header": head, "rows": [asdict(r) for r in rows]}, indent=2,
                                                   default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        timed = [r for r in rows if r.loop_ms]
        fig, ax = plt.subplots(figsize=(10, 0.6 * len(timed) + 1.5))
        ax.barh([r.name[:70] for r in timed], [r.loop_ms for r in timed], color="tab:blue")
        for i, r in enumerate(timed):
            ax.text(r.loop_ms, i, f" {r.loop_ms:.1f} ms", va="center")
        ax.set_xscale("log")
        ax.set_xlabel(f"20-step denoising loop, ms (log scale) - {head['gpu']}")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(cfg.out / "bench.png", dpi=110)
    except ImportError:
        log("matplotlib missing: no bar chart")


def print_table(head, rows: list[Row]) -> None:
    print(f"\nGPU: {head['gpu']} | torch {head['versions'].get('torch')} | profile {head['profile']}")
    print(f"{'method':<75} {'loop ms':>8} {'e2e ms':>7} {'TFLOP/s':>8} {'PSNR':>6} {'minPSNR':>7} {'maxabs':>6} "
          f"{'lat.err':>8} {'GiB':>5} {'build s':>7}")
    f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
    for r in rows:
        print(f"{r.name[:75]:<75} {f(r.loop_ms, '8.1f')} {f(r.end_to_end_ms, '7.1f')} {f(r.tflops, '8.1f')} "
              f"{f(r.psnr_db, '6.1f')} {f(r.min_psnr_db, '7.1f')} {f(r.max_abs, '6d')} {f(r.latent_rel_err, '8.1e')} "
              f"{f(r.peak_mem_gib, '5.1f')} {f(r.compile_s, '7.0f')}")
    for r in rows:
        if r.extra:
            print(f"{r.name[:40]}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.extra.items()))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench needs a CUDA GPU", file=sys.stderr)
        return 2
    profile = get_profile(cfg.profile)
    device = torch.device("cuda")
    head = header(profile)
    work = Workload(cfg, profile, device)
    rows: list[Row] = []
    ref_images = ref_latents = None
    if not cfg.skip_reference:
        log("fp32 reference ...")
        row, ref_images, ref_latents = run_reference(cfg, work, profile)
        rows.append(row)
    bundle = load_bundle(cfg.weights, cache_root=REPO_ROOT / "build" / "weights")
    flops = flops_per_loop(copy.deepcopy(bundle).to(device=device), profile, device)
    head["tflop_per_loop"] = flops / 1e12
    from models.step import TextEncoder
    from models.tokenizer import tokenize

    with torch.no_grad():
        ids = tokenize([PROMPT[0] + ", " + PROMPT[1], PROMPT[2]])
        ref_context = TextEncoder(bundle.text_encoder)(ids)
    for row, imgs, lats in run_diffusers(cfg, work, bundle, profile, device, ref_context):
        if imgs is not None and ref_images is not None:
            fidelity(row, imgs, ref_images, lats, ref_latents)
        rows.append(row)
    del bundle
    log("ours ...")
    row, imgs, lats, rt = run_ours(cfg, work, profile)
    if ref_images is not None:
        fidelity(row, imgs, ref_images, lats, ref_latents)
    rows.append(row)
    for r in rows:
        if r.loop_ms:
            r.tflops = flops / (r.loop_ms * 1e-3) / 1e12
    base = {r.name: r.loop_ms for r in rows}
    compiled = next((v for k, v in base.items() if "torch.compile" in k), None)
    graph = next((v for k, v in base.items() if "one CUDA graph" in k and "compile" not in k), None)
    head["ratios"] = {
        "ours_vs_compiled_graph": row.loop_ms / compiled if compiled else None,
        "ours_vs_fp16_graph": row.loop_ms / graph if graph else None,
    }
    write_outputs(cfg, head, rows)
    print_table(head, rows)
    print(json.dumps(head["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

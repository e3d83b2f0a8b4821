"""TensorRT plans vs the torch modules they were exported from, on the tiny synthetic models.

Needs TensorRT >= 10 and a CUDA GPU (skipped otherwise, i.e. on CPU CI) and the ONNX export of surgery/.
Reference: the fp32 torch modules on the same GPU with TF32 off. Tolerances, per precision of the plan:
- fused step: relative L2 error of the guidance-dependent part of x_prev (x_prev minus its exact x-term,
  sqrt(a_prev)/sqrt(a_t) * x, which would otherwise hide eps errors) <= 1e-4 fp32, 3e-2 fp16;
- text encoder and hint encoder outputs: relative L2 <= 1e-4 fp32, 1e-2 fp16;
- decoded uint8 image: fp32 max |diff| <= 1 (truncation can flip a value at an integer boundary) and mean
  <= 0.05, which also checks that the plan's float->uint8 cast truncates like torch (rounding would give ~0.5);
  fp16 mean |diff| <= 1.0 and max <= 16;
- a CUDA graph of 20 steps replays to the eager result within 1e-5 (same kernels, same inputs), three replays.
"""

from __future__ import annotations

import json

import pytest
import torch

from engines.tensorrt import tensorrt_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not tensorrt_available()[0], reason=tensorrt_available()[1]),
]

from models import load_bundle  # noqa: E402
from models.step import FusedDenoiseStep, HintEncoder, LatentDecoder, TextEncoder  # noqa: E402
from profiles import get_profile  # noqa: E402
from scheduler import control_scales, make_ddim_tables  # noqa: E402

TOL = {"fp32": {"step": 1e-4, "net": 1e-4, "image_max": 1, "image_mean": 0.05},
       "fp16": {"step": 3e-2, "net": 1e-2, "image_max": 16, "image_mean": 1.0}}
STEPS_TO_CHECK = (0, 10, 19)


def _build_onnx():
    try:
        from surgery.build import build_onnx
    except ImportError as exc:
        pytest.skip(f"surgery.build.build_onnx not available: {exc}")
    return build_onnx


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory):
    return tmp_path_factory.mktemp("trt-weights")


@pytest.fixture(scope="session")
def strict_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def reference_modules(source, weights_root):
    """Fresh fp32 modules on the GPU (the export may convert the bundle it is given in place)."""
    bundle = load_bundle(source, cache_root=weights_root).to(device="cuda", dtype=torch.float32)
    return bundle, {"step": FusedDenoiseStep(bundle.unet, bundle.controlnet).eval(),
                    "text": TextEncoder(bundle.text_encoder).eval(), "hint": HintEncoder(bundle.controlnet).eval(),
                    "decode": LatentDecoder(bundle.vae).eval()}


@pytest.fixture(scope="session", params=["256x384-fp32", "256x384-fp16"])
def trt_build(request, tmp_path_factory, weights_root):
    """(profile, onnx_dir, plan_dir, EngineSet) for one profile, built once per session."""
    from engines.tensorrt import build_tensorrt_engines, build_tensorrt_plans

    build_onnx = _build_onnx()
    profile = get_profile(request.param)
    root = tmp_path_factory.mktemp(f"trt-{profile.name}")
    onnx_dir, plan_dir = root / "onnx", root / "tensorrt"
    bundle = load_bundle("synthetic-tiny", cache_root=weights_root)
    build_onnx(bundle, profile, onnx_dir)
    build_tensorrt_plans(onnx_dir, plan_dir, profile)
    engines = build_tensorrt_engines(plan_dir, profile, "cuda", onnx_dir=onnx_dir, weights_id=bundle.weights_id)
    return profile, onnx_dir, plan_dir, engines


def step_inputs(profile, context_dim, hint_module, seed=0):
    gen = torch.Generator("cuda").manual_seed(seed)
    b, _, h, w = profile.latent_shape
    x = torch.randn(profile.latent_shape, device="cuda", generator=gen)
    context = torch.randn((2 * b, 77, context_dim), device="cuda", generator=gen)
    hint = (torch.rand((b, 3, profile.height, profile.width), device="cuda", generator=gen) > 0.9).float()
    with torch.no_grad():
        hint_features = hint_module(hint)
    return x, context, hint, hint_features


def test_plans_are_cached_with_layer_info(trt_build):
    from engines.tensorrt import build_tensorrt_plans
    from engines.tensorrt.settings import NETWORKS, layer_info_path

    profile, onnx_dir, plan_dir, _ = trt_build
    stamps = {n: (plan_dir / f"{n}.plan").stat().st_mtime_ns for n in NETWORKS}
    plans = build_tensorrt_plans(onnx_dir, plan_dir, profile)  # fresh: nothing rebuilt
    assert {n: p.stat().st_mtime_ns for n, p in plans.items()} == stamps
    assert (plan_dir / "timing.cache").stat().st_size > 0
    for network in NETWORKS:
        info = json.loads(layer_info_path(plan_dir, network).read_text())
        assert info  # the inspector's JSON: {"Layers": [...], "Bindings": [...]} (TensorRT 10) or similar


def test_fused_step_matches_torch(trt_build, weights_root, strict_fp32):
    profile, _, _, engines = trt_build
    bundle, ref = reference_modules("synthetic-tiny", weights_root)
    x, context, _, hint_features = step_inputs(profile, bundle.context_dim, ref["hint"])
    tables = make_ddim_tables(profile.ddim_steps).to("cuda")
    scales = control_scales(1.0, False).cuda()
    guidance = torch.tensor([9.0], device="cuda")
    engines.step.prepare(context, hint_features, 9.0, scales)
    for k in STEPS_TO_CHECK:
        with torch.no_grad():
            want = ref["step"](x, tables.timesteps[k : k + 1].float(), tables.coeffs[k], context, hint_features,
                               guidance, scales)
        got = engines.step.step(x, k).clone()
        torch.cuda.synchronize()
        c = tables.coeffs[k]
        x_term = x * (c[2] / c[0])
        err = rel_l2(got - x_term, want - x_term)
        assert err <= TOL[profile.precision.value]["step"], f"step {k}: relative error {err:.2e}"


def test_guess_mode_scales_reach_the_plan(trt_build, weights_root, strict_fp32):
    """control_scales is a live input: guess-mode scales change the result exactly as in torch."""
    profile, _, _, engines = trt_build
    bundle, ref = reference_modules("synthetic-tiny", weights_root)
    x, context, _, hint_features = step_inputs(profile, bundle.context_dim, ref["hint"], seed=1)
    tables = make_ddim_tables(profile.ddim_steps).to("cuda")
    scales = control_scales(0.7, True).cuda()
    engines.step.prepare(context, hint_features, 5.0, scales)
    with torch.no_grad():
        want = ref["step"](x, tables.timesteps[3:4].float(), tables.coeffs[3], context, hint_features,
                           torch.tensor([5.0], device="cuda"), scales)
    got = engines.step.step(x, 3).clone()
    x_term = x * (tables.coeffs[3][2] / tables.coeffs[3][0])
    assert rel_l2(got - x_term, want - x_term) <= TOL[profile.precision.value]["step"]


def test_per_image_networks_match_torch(trt_build, weights_root, strict_fp32):
    profile, _, _, engines = trt_build
    bundle, ref = reference_modules("synthetic-tiny", weights_root)
    tol = TOL[profile.precision.value]
    gen = torch.Generator("cuda").manual_seed(2)
    b = profile.num_samples
    ids = torch.randint(0, 49407, (2 * b, 77), device="cuda", generator=gen)
    ids[:, 0] = 49406  # BOS
    _, _, hint, _ = step_inputs(profile, bundle.context_dim, ref["hint"], seed=2)
    latent = torch.randn(profile.latent_shape, device="cuda", generator=gen)
    with torch.no_grad():
        want = {"text": ref["text"](ids), "hint": ref["hint"](hint), "decode": ref["decode"](latent)}
    got = {"text": engines.text(ids), "hint": engines.hint(hint), "decode": engines.decode(latent)}
    assert rel_l2(got["text"], want["text"]) <= tol["net"]
    assert rel_l2(got["hint"], want["hint"]) <= tol["net"]
    assert got["decode"].dtype == torch.uint8 and got["decode"].shape == want["decode"].shape
    diff = (got["decode"].int() - want["decode"].int()).abs()
    assert diff.max().item() <= tol["image_max"] and diff.float().mean().item() <= tol["image_mean"]


def test_denoise_loop_captures_into_one_cuda_graph(trt_build, weights_root):
    profile, _, _, engines = trt_build
    assert engines.capturable
    bundle, ref = reference_modules("synthetic-tiny", weights_root)
    x_T, context, _, hint_features = step_inputs(profile, bundle.context_dim, ref["hint"], seed=3)
    runner = engines.step
    runner.prepare(context, hint_features, 9.0, control_scales(1.0, False).cuda())

    def loop(x):
        for k in range(profile.ddim_steps):
            x = runner.step(x, k)
        return x

    eager = loop(x_T.clone()).clone()
    static_x = x_T.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop(static_x)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_x)
    for _ in range(3):
        static_x.copy_(x_T)
        graph.replay()
        torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-5)
    # New per-image inputs reach the captured graph through prepare()'s in-place copies.
    runner.prepare(context.flip(0), hint_features, 9.0, control_scales(1.0, False).cuda())
    static_x.copy_(x_T)
    graph.replay()
    torch.testing.assert_close(static_out, loop(x_T.clone()), rtol=1e-5, atol=1e-5)


def test_refit_swaps_in_new_weights(tmp_path, weights_root, strict_fp32):
    """A refittable fp32 plan built from seed-0 weights, refit from the seed-1 export, computes the seed-1 step."""
    from engines.tensorrt import build_tensorrt_plans, load_engine, refit_plan
    from engines.tensorrt.runtime import TensorRTStepRunner

    build_onnx = _build_onnx()
    profile = get_profile("256x384-fp32")
    old_onnx, new_onnx, plan_dir = tmp_path / "onnx0", tmp_path / "onnx1", tmp_path / "plans"
    build_onnx(load_bundle("synthetic-tiny", cache_root=weights_root), profile, old_onnx)
    build_onnx(load_bundle("synthetic-tiny:1", cache_root=weights_root), profile, new_onnx)
    plans = build_tensorrt_plans(old_onnx, plan_dir, profile, refit=True, networks=("fused_step",))
    refitted = refit_plan(plans["fused_step"], new_onnx / "fused_step.onnx", tmp_path / "refit.plan")
    runner = TensorRTStepRunner(load_engine(refitted, "cuda"), profile)

    bundle, ref = reference_modules("synthetic-tiny:1", weights_root)
    x, context, _, hint_features = step_inputs(profile, bundle.context_dim, ref["hint"], seed=4)
    tables = make_ddim_tables(profile.ddim_steps).to("cuda")
    scales = control_scales(1.0, False).cuda()
    runner.prepare(context, hint_features, 9.0, scales)
    with torch.no_grad():
        want = ref["step"](x, tables.timesteps[5:6].float(), tables.coeffs[5], context, hint_features,
                           torch.tensor([9.0], device="cuda"), scales)
    got = runner.step(x, 5).clone()
    x_term = x * (tables.coeffs[5][2] / tables.coeffs[5][0])
    assert rel_l2(got - x_term, want - x_term) <= TOL["fp32"]["step"]

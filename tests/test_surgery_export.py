"""The exported ONNX files against the torch modules they came from (tiny synthetic weights, onnxruntime CPU).

Tolerances: fp32 graphs must match torch to float32 rounding (the fused step: max abs error <= 1e-4 * max |ref|, in
practice ~1e-6); fp16 graphs run on onnxruntime CPU, which computes fp16 ops by casting to float32 and back, so
they are compared with torch's own fp16 CPU run at 2e-2 * max |ref| (measured ~1e-3).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.step import FusedDenoiseStep, HintEncoder, LatentDecoder, TextEncoder, network_io
from profiles import Precision
from scheduler import control_scales, make_ddim_tables
from surgery.onnx_io import load_graph
from surgery.passes import infer_tensor_types
from surgery.precision import FP16_UPCAST_OPS
from tests.surgery_fixtures import build, small_profile


@pytest.fixture(scope="session")
def fp32_build(tmp_path_factory, bundle):
    profile = small_profile(Precision.FP32)
    return profile, build(tmp_path_factory, bundle, profile, "64x64-fp32")


@pytest.fixture(scope="session")
def fp16_build(tmp_path_factory, bundle):
    profile = small_profile(Precision.FP16)
    return profile, build(tmp_path_factory, bundle, profile, "64x64-fp16")


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def hint_channels(bundle):
    return bundle.controlnet.config.block_out_channels[0]


def step_feeds(bundle, profile, steps=(0, 9, 19), seed=0):
    """Random per-image inputs with guess-mode scales (rows differ, so a swapped cond/uncond half shows) and the
    schedule's t / coeffs of a few steps."""
    io = network_io(profile, bundle.context_dim, hint_channels(bundle))["fused_step"]
    gen = torch.Generator().manual_seed(seed)
    tables = make_ddim_tables(profile.ddim_steps)
    for k in steps:
        yield {
            "x": torch.randn(io["x"].shape, generator=gen),
            "timestep": torch.tensor([float(tables.timesteps[k])]),
            "coeffs": tables.coeffs[k].clone(),
            "context": torch.randn(io["context"].shape, generator=gen),
            "hint_features": torch.randn(io["hint_features"].shape, generator=gen),
            "guidance_scale": torch.tensor([9.0]),
            "control_scales": control_scales(0.7, guess_mode=True),
        }


def check_step_parity(bundle, profile, path, dtype, rel_tol):
    torch_step = FusedDenoiseStep(copy.deepcopy(bundle.unet).to(dtype), copy.deepcopy(bundle.controlnet).to(dtype))
    sess = session(path)
    worst = 0.0
    for feed in step_feeds(bundle, profile):
        with torch.no_grad():
            ref = torch_step(*feed.values()).numpy()
        (out,) = sess.run(["x_prev"], {k: v.numpy() for k, v in feed.items()})
        assert out.dtype == np.float32 and out.shape == ref.shape
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        worst = max(worst, err)
    assert worst <= rel_tol, f"fused step differs from FusedDenoiseStep by {worst:.2e} of max |x_prev|"
    return worst


def test_fused_step_fp32_matches_torch(bundle, fp32_build):
    profile, paths = fp32_build
    check_step_parity(bundle, profile, paths["fused_step"], torch.float32, rel_tol=1e-4)


def test_fused_step_batch2_matches_torch(tmp_path_factory, bundle):
    # num_samples=2: the glue's repeat_interleave of the (2, 13) scales and the [x, x] concat at batch 4.
    profile = small_profile(Precision.FP32, num_samples=2)
    paths = build(tmp_path_factory, bundle, profile, "64x64-fp32-x2")
    check_step_parity(bundle, profile, paths["fused_step"], torch.float32, rel_tol=1e-4)


def test_fused_step_has_io_contract_and_both_networks_weights(bundle, fp32_build):
    profile, paths = fp32_build
    model = onnx.load(str(paths["fused_step"]))
    io = network_io(profile, bundle.context_dim, hint_channels(bundle))["fused_step"]
    names = [i.name for i in model.graph.input] + [o.name for o in model.graph.output]
    assert names == list(io)
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert tuple(d.dim_value for d in value.type.tensor_type.shape.dim) == io[value.name].shape
    assert model.opset_import[0].version >= 17
    # One graph holding every weight of both networks (the hint block lives in hint_encoder.onnx instead).
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for prefix, param in [("controlnet/", bundle.controlnet.conv_in.weight),
                          ("controlnet/", bundle.controlnet.controlnet_mid_block.weight),
                          ("unet/", bundle.unet.conv_in.weight), ("unet/", bundle.unet.conv_out.weight)]:
        hits = [n for n, a in arrays.items() if a.shape == param.shape and np.array_equal(a, param.numpy())]
        assert hits and all(n.startswith(prefix) for n in hits), (prefix, tuple(param.shape), hits)
    sizes = {"controlnet/": 0, "unet/": 0}
    for name, array in arrays.items():
        for prefix in sizes:
            sizes[prefix] += array.size if name.startswith(prefix) else 0
    hint_block = set(id(p) for p in bundle.controlnet.controlnet_cond_embedding.parameters())
    expected = {"controlnet/": _distinct_numel(p for p in bundle.controlnet.parameters() if id(p) not in hint_block),
                "unet/": _distinct_numel(bundle.unet.parameters())}
    for prefix, n in expected.items():
        # Folded constants (time-embedding frequencies, GroupNorm's unit scales) add a little on top.
        assert n <= sizes[prefix] <= n * 1.01 + 4096, (prefix, sizes[prefix], n)


def _distinct_numel(params) -> int:
    """Elements of the distinct parameter values: the exporter stores equal initializers once (the synthetic
    weights' norm scales are all ones, their biases all zeros)."""
    distinct = {(tuple(p.shape), p.detach().numpy().tobytes()): p.numel() for p in params}
    return sum(distinct.values())


def test_networks_fp32_match_torch(bundle, fp32_build):
    profile, paths = fp32_build
    gen = torch.Generator().manual_seed(1)
    b = profile.num_samples
    ids = torch.randint(0, 49406, (2 * b, 77), generator=gen)
    ids[:, 0] = 49406
    hint = (torch.rand((b, 3, profile.height, profile.width), generator=gen) > 0.8).float()
    latent = torch.randn(profile.latent_shape, generator=gen) * 3
    cases = [("text_encoder", TextEncoder(bundle.text_encoder), ids, 1e-4),
             ("hint_encoder", HintEncoder(bundle.controlnet), hint, 1e-5),
             ("vae_decoder", LatentDecoder(bundle.vae), latent, None)]
    for name, module, arg, tol in cases:
        with torch.no_grad():
            ref = module(arg).numpy()
        sess = session(paths[name])
        (out,) = sess.run(None, {sess.get_inputs()[0].name: arg.numpy()})
        assert out.dtype == ref.dtype and out.shape == ref.shape, name
        if tol is None:  # uint8 image: truncation can flip a level where the float sits on an integer
            assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1, name
        else:
            assert np.abs(out - ref).max() <= tol * max(1.0, np.abs(ref).max()), name


def test_fp16_graphs_are_strongly_typed_friendly(bundle, fp16_build):
    profile, paths = fp16_build
    # Exported from fp16 copies: the caller's bundle is still float32.
    assert all(p.dtype == torch.float32 for m in bundle.modules().values() for p in m.parameters())
    io = network_io(profile, bundle.context_dim, hint_channels(bundle))
    for name, path in paths.items():
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        boundary = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        want = {n: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(str(s.dtype).replace("torch.", "")))
                for n, s in io[name].items()}
        assert boundary == want, name
        graph = load_graph(path)
        types = infer_tensor_types(graph)
        weights = [t for t in graph.tensors().values() if hasattr(t, "values") and t.values.size > 64]
        if name != "hint_encoder" or weights:
            assert any(w.values.dtype == np.float16 for w in weights), f"{name} has no fp16 weights"
        norms = [n for n in graph.nodes if n.op in FP16_UPCAST_OPS]
        assert name == "hint_encoder" or norms, name
        for node in norms:
            assert types[node.inputs[0].name] == np.float32, (name, node.name)
    # The UNet/ControlNet convolutions really run in fp16.
    step = load_graph(paths["fused_step"])
    step_types = infer_tensor_types(step)
    convs = [n for n in step.nodes if n.op == "Conv"]
    assert convs and all(step_types[n.inputs[0].name] == np.float16 for n in convs)


def test_fused_step_fp16_matches_torch_fp16(bundle, fp16_build):
    profile, paths = fp16_build
    check_step_parity(bundle, profile, paths["fused_step"], torch.float16, rel_tol=2e-2)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")  # torch.export internals
def test_dynamo_exporter_fallback_matches_torch(tmp_path_factory, bundle):
    """The fallback for when torch drops the TorchScript exporter: same surgery, opset 18, same numerics."""
    from surgery.export import DYNAMO_OPSET, ExportOptions

    profile = small_profile(Precision.FP32)
    paths = build(tmp_path_factory, bundle, profile, "64x64-fp32-dynamo", options=ExportOptions(dynamo=True))
    assert onnx.load(str(paths["fused_step"])).opset_import[0].version == DYNAMO_OPSET
    check_step_parity(bundle, profile, paths["fused_step"], torch.float32, rel_tol=1e-4)

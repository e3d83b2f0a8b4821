"""The onnxruntime EngineSet: a whole 20-step canny2image run from the ONNX files against the same loop over the
torch modules (tiny synthetic weights, 256x384, fp32), and the backend's errors."""

from __future__ import annotations

import dataclasses
import shutil
import sys

import numpy as np
import pytest
import torch

from artifacts.manifest import Manifest
from engines.base import EngineSet, StepRunner
from engines.onnxruntime_backend import build_onnxruntime_engines
from models.step import FusedDenoiseStep, HintEncoder, LatentDecoder, TextEncoder
from models.tokenizer import tokenize
from profiles import ControlNetRTError, Precision, get_profile
from scheduler import control_scales, make_ddim_tables
from tests.surgery_fixtures import build, small_profile


@pytest.fixture(scope="session")
def full_size(tmp_path_factory, bundle):
    profile = get_profile("256x384-fp32")
    return profile, build(tmp_path_factory, bundle, profile, profile.name)["fused_step"].parent


@pytest.fixture(scope="session")
def small(tmp_path_factory, bundle):
    profile = small_profile(Precision.FP32)
    return profile, build(tmp_path_factory, bundle, profile, "64x64-fp32")["fused_step"].parent


def edge_hint(profile, seed=0) -> torch.Tensor:
    """A canny-like hint: sparse {0, 1} edges, the same in all 3 channels."""
    gen = torch.Generator().manual_seed(seed)
    edges = (torch.rand((profile.num_samples, 1, profile.height, profile.width), generator=gen) > 0.9).float()
    return edges.expand(-1, 3, -1, -1).contiguous()


def run_pipeline(text, hint, prepare, step, decode, profile, ids, hint_image, noise):
    context = text(ids)
    features = hint(hint_image)
    prepare(context, features, 9.0, control_scales(1.0, guess_mode=False))
    x = noise.clone()
    for k in range(profile.ddim_steps):
        x = step(x, k)
    return x, decode(x)


def test_twenty_steps_match_the_torch_loop(bundle, full_size):
    profile, onnx_dir = full_size
    engines = build_onnxruntime_engines(onnx_dir, profile, bundle)
    assert isinstance(engines, EngineSet) and isinstance(engines.step, StepRunner)
    assert engines.device.type == "cpu" and not engines.capturable

    ids = tokenize(["a bird, best quality, extremely detailed", "longbody, lowres, bad anatomy"])
    hint_image = edge_hint(profile)
    noise = torch.randn(profile.latent_shape, generator=torch.Generator().manual_seed(2946901))

    # The same loop over the torch modules, feeding each step what the StepRunner promises to feed.
    tables = make_ddim_tables(profile.ddim_steps)
    fused = FusedDenoiseStep(bundle.unet, bundle.controlnet)
    prepared = {}

    def torch_prepare(context, features, scale, scales):
        prepared.update(context=context, hint_features=features, guidance_scale=torch.tensor([scale]),
                        control_scales=scales)

    def torch_step(x, k):
        return fused(x, torch.tensor([float(tables.timesteps[k])]), tables.coeffs[k], prepared["context"],
                     prepared["hint_features"], prepared["guidance_scale"], prepared["control_scales"])

    with torch.no_grad():
        ref_latent, ref_image = run_pipeline(TextEncoder(bundle.text_encoder), HintEncoder(bundle.controlnet),
                                             torch_prepare, torch_step, LatentDecoder(bundle.vae), profile, ids,
                                             hint_image, noise)
    latent, image = run_pipeline(engines.text, engines.hint, engines.step.prepare, engines.step.step,
                                 engines.decode, profile, ids, hint_image, noise)

    assert image.dtype == torch.uint8 and image.shape == (1, 256, 384, 3)
    assert ref_image.float().std() > 10, "degenerate test image: the comparison would prove nothing"
    latent_err = (latent - ref_latent).abs().max().item() / ref_latent.abs().max().item()
    assert latent_err < 1e-4, latent_err
    levels = (image.int() - ref_image.int()).abs().max().item()
    assert levels <= 3, f"uint8 images differ by up to {levels} levels"


def test_step_runner_contract(small):
    profile, onnx_dir = small
    engines = build_onnxruntime_engines(onnx_dir, profile)
    x = torch.zeros(profile.latent_shape)
    with pytest.raises(ControlNetRTError, match="before prepare"):
        engines.step.step(x, 0)
    context = torch.zeros((2, 77, 32))
    features = engines.hint(edge_hint(profile))
    engines.step.prepare(context, features, 9.0, control_scales(1.0, False))
    with pytest.raises(ControlNetRTError, match="outside the 20-step schedule"):
        engines.step.step(x, 20)
    assert engines.step.step(x, 19).shape == profile.latent_shape


def test_errors_name_the_fix(tmp_path, bundle, small, full_size, monkeypatch):
    profile, onnx_dir = small
    with pytest.raises(ControlNetRTError, match="python3 -m surgery"):
        build_onnxruntime_engines(tmp_path / "nowhere", profile)
    with pytest.raises(ControlNetRTError, match="was built for profile"):
        build_onnxruntime_engines(full_size[1], profile)
    with pytest.raises(ControlNetRTError, match="built from weights"):
        build_onnxruntime_engines(onnx_dir, profile, dataclasses.replace(bundle, weights_id="other"))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(onnx_dir, incomplete)
    manifest = Manifest.load(incomplete)
    del manifest.artifacts["fused_step"]
    manifest.save(incomplete)
    with pytest.raises(ControlNetRTError, match="incomplete"):
        build_onnxruntime_engines(incomplete, profile)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ControlNetRTError, match="pip install onnxruntime"):
        build_onnxruntime_engines(onnx_dir, profile)


def test_loop_output_is_deterministic(small):
    """Same inputs, same image: the runner keeps no state between runs besides what prepare() sets."""
    profile, onnx_dir = small
    engines = build_onnxruntime_engines(onnx_dir, profile)
    ids = tokenize(["a", "b"])
    noise = torch.randn(profile.latent_shape, generator=torch.Generator().manual_seed(0))
    runs = [run_pipeline(engines.text, engines.hint, engines.step.prepare, engines.step.step, engines.decode,
                         profile, ids, edge_hint(profile), noise)[1] for _ in range(2)]
    assert np.array_equal(runs[0].numpy(), runs[1].numpy())

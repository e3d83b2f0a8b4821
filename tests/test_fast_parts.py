"""The torch backend's fast step (precomputed time/text tables, fused QKV, three parts) computes the same function
as models.step.FusedDenoiseStep: fp32 on CPU, every part eager."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engines.torch_fast.compile import CompileMode, PartCompiler
from engines.torch_fast.runner import FastStepRunner
from models.step import FusedDenoiseStep
from profiles import get_profile
from scheduler import control_scales, make_ddim_tables


@pytest.mark.parametrize("num_samples, guess_mode", [(1, False), (2, True)])
def test_fast_step_matches_fused_step(tiny_bundle, tmp_path, num_samples, guess_mode):
    profile = dataclasses.replace(get_profile("256x384-fp32"), name="t", height=128, width=192,
                                  num_samples=num_samples)
    runner = FastStepRunner(tiny_bundle, profile, torch.device("cpu"), PartCompiler(CompileMode.EAGER, tmp_path, {}))
    reference = FusedDenoiseStep(tiny_bundle.unet, tiny_bundle.controlnet)
    tables = make_ddim_tables(20)
    g = torch.Generator().manual_seed(3)
    b, c, h, w = profile.latent_shape
    context = torch.randn(2 * b, 77, tiny_bundle.context_dim, generator=g)
    hint = torch.randn(b, 32, h, w, generator=g) * 0.5
    x = torch.randn(b, c, h, w, generator=g)
    scales = control_scales(0.8, guess_mode)
    runner.prepare(context, hint, 7.5, scales)
    for k in (0, 11, 19):
        with torch.no_grad():
            ours = runner.step(x, k)
            ref = reference(x, tables.timesteps[k : k + 1].float(), tables.coeffs[k], context, hint,
                            torch.tensor([7.5]), scales)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # a new prompt must reach the precomputed K/V
    runner.prepare(context.flip(0), hint, 7.5, scales)
    with torch.no_grad():
        moved = runner.step(x, 0)
        ref = reference(x, tables.timesteps[:1].float(), tables.coeffs[0], context.flip(0), hint,
                        torch.tensor([7.5]), scales)
    torch.testing.assert_close(moved, ref, rtol=1e-4, atol=1e-4)


def test_stage_ranges_are_visible_to_the_profiler(tiny_bundle, weights_cache):
    import numpy as np

    from canny2image_TRT import hackathon

    hk = hackathon()
    hk.initialize(weights="synthetic-tiny", profile="256x384-fp32", backend="torch", device="cpu",
                  build_root=weights_cache.parent / "build-trace")
    image = np.random.default_rng(0).integers(0, 255, (256, 384, 3), dtype=np.uint8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hk.process(image, "a", "b", "c", 1, 256, 20, False, 1, 9, 1, 0.0, 100, 200)
    names = {e.name for e in prof.events()}
    for stage in ("preprocess", "text", "hint", "denoise", "decode", "to-host", "step 0", "step 19"):
        assert stage in names, stage


@pytest.mark.parametrize("stacks", [1, 2])
def test_channels_last_group_norm_equals_group_norm(stacks):
    """stacked_group_norm's channels_last path (rows in memory order) computes F.group_norm + the per-run affine."""
    import torch.nn.functional as F

    from engines.torch_fast.parts import stacked_group_norm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2 * stacks, 96, 6, 10, generator=g) * 3 + 1).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(stacks, 96, generator=g), torch.randn(stacks, 96, generator=g)
    got = stacked_group_norm(x, 32, 1e-5, weight, bias)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    ref = torch.cat([F.group_norm(half, 32, w, b, 1e-5)
                     for half, w, b in zip(x.contiguous().chunk(stacks), weight, bias)])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stacked_group_norm(x.contiguous(), 32, 1e-5, weight, bias), ref, atol=2e-5, rtol=1e-5)


def test_vae_group_norms_swapped_keep_their_function(tiny_bundle):
    """use_channels_last_group_norm swaps every nn.GroupNorm of the VAE decoder; its output does not change."""
    import copy

    from engines.torch_fast.parts import ChannelsLastGroupNorm, use_channels_last_group_norm

    decoder = copy.deepcopy(tiny_bundle.vae.decoder).to(memory_format=torch.channels_last)
    z = torch.randn(1, decoder.conv_in.in_channels, 8, 12).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = decoder(z)
        count = use_channels_last_group_norm(decoder)
        got = decoder(z)
    assert count > 0 and not any(type(m) is torch.nn.GroupNorm for m in decoder.modules())
    assert sum(isinstance(m, ChannelsLastGroupNorm) for m in decoder.modules()) == count
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_inductor_option_values_from_the_environment():
    from engines.torch_fast.compile import _option_value

    assert _option_value("1") is True and _option_value("0") is False
    assert _option_value("100") == 100
    assert _option_value("max-autotune") == "max-autotune"


def test_artifacts_live_in_one_directory_per_gpu_model(monkeypatch, tmp_path):
    from engines.torch_fast.compile import device_artifact_dir

    assert device_artifact_dir(tmp_path, torch.device("cpu")) == tmp_path
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_artifact_dir(tmp_path, torch.device("cuda")) == tmp_path / "nvidia-h100-80gb-hbm3"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_artifact_dir(tmp_path, torch.device("cuda")) == tmp_path / "nvidia-h200"

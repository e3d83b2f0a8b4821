"""The twin encoder (UNet encoder + ControlNet batched as one network) computes the two-part step exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from engines.torch_fast import twin as twin_module
from engines.torch_fast.compile import CompileMode, PartCompiler
from engines.torch_fast.runner import ConvKernels, FastStepRunner, StepLayout, _prepare_step_layers
from engines.torch_fast.twin import TwinEncoder, can_pair
from profiles import get_profile


def _step_inputs(bundle, profile, seed: int):
    """Random latent, prompt context, hint features and control scales for one step of `bundle`."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = profile.latent_shape
    x = torch.randn(b, c, h, w, generator=g)
    context = torch.randn(2 * b, 77, bundle.context_dim, generator=g)
    hint = torch.randn(b, bundle.controlnet.config.block_out_channels[0], h, w, generator=g)
    return x, context, hint, torch.rand(2, 13, generator=g)


@pytest.mark.parametrize("k", [0, 13])
def test_twin_step_equals_two_part_step(tiny_bundle, tmp_path, k):
    profile = get_profile("256x384-fp32")
    device = torch.device("cpu")
    compiler = PartCompiler(CompileMode.EAGER, tmp_path, {})
    bundle = copy.deepcopy(tiny_bundle)
    twin = _prepare_step_layers(bundle, profile, device, compiler, ConvKernels.CUDNN, StepLayout.TWIN).twin
    assert isinstance(twin, TwinEncoder)
    x, context, hint, scales = _step_inputs(bundle, profile, seed=k)
    outs = []
    for runner_twin in (None, twin):
        runner = FastStepRunner(bundle, profile, device, compiler, runner_twin)
        runner.prepare(context, hint, 7.5, scales)
        with torch.no_grad():
            outs.append(runner.step(x, k))
    assert outs[0].abs().max() > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_unpairable_networks_are_refused(tiny_bundle):
    other = copy.deepcopy(tiny_bundle.controlnet)
    block = other.down_blocks[0].resnets[0]
    block.conv1 = torch.nn.Conv2d(block.conv1.in_channels, block.conv1.out_channels, 1)
    assert not can_pair(tiny_bundle.unet, other)
    with pytest.raises(ValueError, match="cannot pair"):
        TwinEncoder(tiny_bundle.unet, other, {})


def test_first_resnet_pair_runs_once_for_both_cfg_rows(tiny_bundle, tmp_path):
    """The first ResNet pair sees one copy of the CFG batch per network (2B rows, not 4B), and so does the first
    transformer pair when it comes next (it doubles its rows at the cross-attention); later layers all 4B."""
    profile = get_profile("256x384-fp32")
    compiler = PartCompiler(CompileMode.EAGER, tmp_path, {})
    bundle = copy.deepcopy(tiny_bundle)
    twin = _prepare_step_layers(bundle, profile, torch.device("cpu"), compiler, ConvKernels.CUDNN,
                                StepLayout.TWIN).twin
    seen = []
    for layer in twin.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    runner = FastStepRunner(bundle, profile, torch.device("cpu"), compiler, twin)
    seen.clear()  # building the runner ran the twin once on example inputs
    b, c, h, w = profile.latent_shape
    runner.prepare(torch.randn(2 * b, 77, bundle.context_dim), torch.randn(b, runner.hint_channels, h, w), 7.5,
                   torch.ones(2, 13))
    with torch.no_grad():
        runner.step(torch.randn(b, c, h, w), 0)
    shared = 2 if twin_module.SHARE_SELF_ATTENTION and twin.plan[1] == "transformer" else 1
    assert twin.plan[1] == "transformer"  # the tiny model is SD-shaped: the sharing is exercised
    assert seen[:shared] == [2 * b] * shared and set(seen[shared:]) == {4 * b}, seen


def test_twin_with_swapped_convolutions_leaves_its_own_layers_unconverted(tiny_bundle, tmp_path):
    """With 1x1 convolutions swapped for matmuls, the twin step still equals the plain one; the layers the twin
    runs from its stacked weights get no converted copy, the zero convolutions (which it calls) do."""
    from engines.torch_fast.gemm_conv import GemmConv2d

    profile = get_profile("256x384-fp32")
    device = torch.device("cpu")
    compiler = PartCompiler(CompileMode.EAGER, tmp_path, {})
    plain, swapped = copy.deepcopy(tiny_bundle), copy.deepcopy(tiny_bundle)
    twins = [_prepare_step_layers(bundle, profile, device, compiler, kernels, StepLayout.TWIN).twin
             for bundle, kernels in ((plain, ConvKernels.CUDNN), (swapped, ConvKernels.POINTWISE))]
    for net in (swapped.unet, swapped.controlnet):
        encoder = list(net.down_blocks) + [net.mid_block]
        assert not any(isinstance(m, GemmConv2d) for block in encoder for m in block.modules())
    assert isinstance(swapped.controlnet.controlnet_mid_block, GemmConv2d)  # 64 channels: wide enough
    x, context, hint, scales = _step_inputs(tiny_bundle, profile, seed=5)
    outs = []
    for bundle, twin in zip((plain, swapped), twins):
        runner = FastStepRunner(bundle, profile, device, compiler, twin)
        runner.prepare(context, hint, 9.0, scales)
        with torch.no_grad():
            outs.append(runner.step(x, 7))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold", ["feed_forward", "cross_attention"])
def test_folded_layers_equal_the_unfolded_step(tiny_bundle, tmp_path, monkeypatch, fold):
    """The folds of this package change no function: the last ff2 inside proj_out (`residual_gemm.
    folds_feed_forward`) and the cross-attention through per-prompt A / B (`folded_cross`), each against the step
    built with it off (twin encoder and decoder both)."""
    from engines.torch_fast import folded_cross, residual_gemm

    module, switch = (folded_cross, "ENABLED") if fold == "cross_attention" else (residual_gemm, "FOLD_FF_PROJ_OUT")

    def is_folded(runner, twin) -> bool:
        if fold == "cross_attention":
            return runner.twin_kv[0].dim() == 3  # A (NB, C, H * 80), not K (NB, H, 77, d)
        return any(getattr(t, "ff_out", None) is not None for t in twin.modules())

    profile = get_profile("256x384-fp32")
    device = torch.device("cpu")
    x, context, hint, scales = _step_inputs(tiny_bundle, profile, seed=5)
    outs, folded = [], []
    for on in (True, False):
        monkeypatch.setattr(module, switch, on)
        compiler = PartCompiler(CompileMode.EAGER, tmp_path / str(on), {})
        bundle = copy.deepcopy(tiny_bundle)
        layers = _prepare_step_layers(bundle, profile, device, compiler, ConvKernels.CUDNN, StepLayout.TWIN)
        runner = FastStepRunner(bundle, profile, device, compiler, layers.twin)
        runner.prepare(context, hint, 7.5, scales)
        folded.append(is_folded(runner, layers.twin))
        with torch.no_grad():
            outs.append(runner.step(x, 7))
    assert folded == [True, False]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)

"""The twin encoder (UNet encoder + ControlNet batched as one network) computes the two-part step exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from engines.torch_fast.compile import CompileMode, PartCompiler
from engines.torch_fast.runner import ConvKernels, FastStepRunner, StepLayout, _prepare_step_layers
from engines.torch_fast.twin import TwinEncoder, can_pair
from profiles import get_profile


@pytest.mark.parametrize("k", [0, 13])
def test_twin_step_equals_two_part_step(tiny_bundle, tmp_path, k):
    profile = get_profile("256x384-fp32")
    device = torch.device("cpu")
    compiler = PartCompiler(CompileMode.EAGER, tmp_path, {})
    bundle = copy.deepcopy(tiny_bundle)
    twin = _prepare_step_layers(bundle, profile, device, compiler, ConvKernels.CUDNN, StepLayout.TWIN).twin
    assert isinstance(twin, TwinEncoder)
    g = torch.Generator().manual_seed(k)
    b, c, h, w = profile.latent_shape
    x = torch.randn(b, c, h, w, generator=g)
    context = torch.randn(2 * b, 77, bundle.context_dim, generator=g)
    hint = torch.randn(b, bundle.controlnet.config.block_out_channels[0], h, w, generator=g)
    scales = torch.rand(2, 13, generator=g)
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
    """The first ResNet pair sees one copy of the CFG batch per network (2B rows, not 4B); later layers all 4B."""
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
    assert seen[0] == 2 * b and set(seen[1:]) == {4 * b}, seen

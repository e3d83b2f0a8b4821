"""Finer split reductions (`compile.FinerSplits`, CNRT_INDUCTOR_SPLIT_RUN): a reduction Inductor splits is split
into runs of at most `run` elements, reductions it keeps whole (or larger than the step's) stay as Inductor has
them, and the choice reaches Inductor's lowering, also in a thread that compiled before (CPU: Inductor's Triton
code generator through `bench.inductor_cpu_code`, which records the kernels instead of building them)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

from engines.torch_fast import compile as compile_mod
from engines.torch_fast.compile import FinerSplits


def _inductor_splits(device, reduction_numel_hint, numel_hint, inner_reduction):
    """A stand-in for Inductor's heuristic, which on a CPU never splits: two runs for reductions of 960 or more."""
    return 2 if reduction_numel_hint >= 960 else 1


@pytest.fixture
def splitting_inductor(monkeypatch):
    monkeypatch.setattr(InductorChoices, "reduction_split_factor", staticmethod(_inductor_splits))


def test_only_splits_inductor_makes_get_finer(splitting_inductor):
    choices = FinerSplits(1024)
    assert choices.reduction_split_factor(None, 15360, 128, True) == 15  # 2 runs of 7680 -> 15 runs of 1024
    assert choices.reduction_split_factor(None, 1500, 64, False) == 2  # runs already shorter than 1024
    assert choices.reduction_split_factor(None, 900, 64, True) == 1  # kept whole by Inductor: stays whole
    assert choices.reduction_split_factor(None, 98304, 32, True) == 2  # the VAE's large groups: Inductor's split
    assert choices.uuid() != FinerSplits(2048).uuid()  # the run is in Inductor's cache key


def _statistics_run(run: "int | None") -> int:
    """r0_numel of the first kernel Inductor generates for silu(group_norm(x)) on a (2, 320, 8, 12) channels_last
    map (its statistics: 32 groups of 960 elements an image), with FinerSplits(run) or Inductor's own choices."""
    from bench.inductor_cpu_code import triton_kernels
    from engines.torch_fast.parts import stacked_group_norm

    x = torch.randn(2, 320, 8, 12).half().contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(320).half(), torch.randn(320).half()
    with V.set_choices_handler(FinerSplits(run) if run else InductorChoices()):
        kernels = triton_kernels(lambda t: F.silu(stacked_group_norm(t, 32, 1e-5, weight, bias)), x)
    name, source = kernels[0]
    assert "var_mean" in name, [k for k, _ in kernels]
    return int(re.search(r"r0_numel = (\d+)", source).group(1))


def test_finer_splits_reach_inductor_lowering(splitting_inductor):
    pytest.importorskip("triton")
    assert _statistics_run(None) == 480  # Inductor's two runs
    assert _statistics_run(240) == 240  # four runs of 240


def test_use_finer_splits_switches_a_thread_that_compiled_before(monkeypatch):
    import torch._inductor.config as cfg

    monkeypatch.setattr(cfg, "inductor_choices_class", None)
    with V.set_choices_handler(InductorChoices()):  # as after the bench's torch.compile baseline
        compile_mod.use_finer_splits(512)
        assert isinstance(V.choices, FinerSplits) and V.choices.run == 512
        assert cfg.inductor_choices_class().uuid().startswith("cnrt-finer-splits-512-")

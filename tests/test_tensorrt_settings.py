"""TensorRT backend pieces that need no TensorRT: build settings, dtype table, availability, lazy import.

These run everywhere (CPU CI included); the engine tests that need TensorRT and a GPU are in
test_tensorrt_engine.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engines.tensorrt import NETWORKS, TRT_TO_TORCH, BuildOptions, build_settings, tensorrt_available, torch_dtype
from engines.tensorrt.dtypes import TORCH_TO_TRT, trt_dtype_name, trt_type_name
from engines.tensorrt.settings import input_shapes, plan_path, timing_cache_path
from models.step import NETWORK_OUTPUTS, network_io
from profiles import PROFILES, ControlNetRTError, Precision, get_profile

REPO = Path(__file__).resolve().parent.parent
# (context_dim, hint_channels): SD1.5 and the tiny test architecture
DIMS = [(768, 320), (32, 32)]
# Flags TensorRT 10 rejects on strongly typed networks (and 11 removed): never ours.
WEAK_TYPING_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                     "PREFER_PRECISION_CONSTRAINTS"}


@pytest.mark.parametrize("profile_name", sorted(PROFILES))
@pytest.mark.parametrize("dims", DIMS)
def test_static_shapes_are_network_io_inputs(profile_name, dims):
    profile = get_profile(profile_name)
    io = network_io(profile, *dims)
    for network in NETWORKS:
        settings = build_settings(profile, network, *dims, plan_dir="/tmp/plans")
        expected = [(name, tuple(spec.shape)) for name, spec in io[network].items()
                    if name not in NETWORK_OUTPUTS[network]]
        assert list(settings.input_shapes) == expected
        assert settings.shapes == dict(expected)
        assert settings.network == network and settings.strongly_typed


def test_fused_step_shapes_for_two_samples():
    profile = get_profile("256x384-fp16-x2")
    shapes = input_shapes(profile, "fused_step", 768, 320)
    assert shapes["x"] == (2, 4, 32, 48)
    assert shapes["context"] == (4, 77, 768)  # [cond] * 2 + [uncond] * 2
    assert shapes["hint_features"] == (2, 320, 32, 48)
    assert shapes["timestep"] == (1,) and shapes["coeffs"] == (4,) and shapes["control_scales"] == (2, 13)
    assert input_shapes(profile, "vae_decoder", 768, 320) == {"latent": (2, 4, 32, 48)}
    assert input_shapes(profile, "text_encoder", 768, 320) == {"input_ids": (4, 77)}


def test_unknown_network_is_a_user_error():
    with pytest.raises(ControlNetRTError, match="unknown network"):
        build_settings(get_profile("256x384-fp16"), "unet", 768, 320, "/tmp")


@pytest.mark.parametrize("level", [0, 3, 5])
def test_optimization_level_comes_from_the_profile(level):
    profile = replace(get_profile("256x384-fp16"), trt_optimization_level=level)
    assert build_settings(profile, "fused_step", 768, 320, "/tmp").optimization_level == level


@pytest.mark.parametrize("level", [-1, 6])
def test_optimization_level_out_of_range_names_the_range(level):
    profile = replace(get_profile("256x384-fp16"), trt_optimization_level=level)
    with pytest.raises(ControlNetRTError, match="0..5"):
        build_settings(profile, "fused_step", 768, 320, "/tmp")


@pytest.mark.parametrize("profile_name", ["256x384-fp16", "256x384-fp32"])
def test_refit_flag_follows_the_option(profile_name):
    profile = get_profile(profile_name)
    on = build_settings(profile, "fused_step", 768, 320, "/tmp", BuildOptions(refit=True))
    off = build_settings(profile, "fused_step", 768, 320, "/tmp", BuildOptions(refit=False))
    assert "REFIT" in on.set_flags and "REFIT" not in off.set_flags
    # REFIT_IDENTICAL would promise the same weights: wrong for swapping in a new checkpoint.
    assert "REFIT_IDENTICAL" not in on.set_flags
    assert on.as_key() != off.as_key()  # so toggling refit rebuilds the plans


def test_precision_choices():
    fp32 = build_settings(get_profile("256x384-fp32"), "fused_step", 768, 320, "/tmp")
    fp16 = build_settings(get_profile("256x384-fp16"), "fused_step", 768, 320, "/tmp")
    # The fp32 profile is the reference: no TF32 anywhere.
    assert "TF32" in fp32.clear_flags and "TF32" not in fp32.set_flags
    assert "TF32" in fp16.set_flags and "TF32" not in fp16.clear_flags
    for settings in (fp32, fp16):
        assert settings.strongly_typed
        assert not WEAK_TYPING_FLAGS & set(settings.set_flags)
    assert get_profile("256x384-fp16").precision is Precision.FP16


def test_workspace_and_verbosity():
    settings = build_settings(get_profile("256x384-fp16"), "vae_decoder", 768, 320, "/tmp",
                              BuildOptions(workspace_bytes=1 << 30, verbose=True))
    assert settings.workspace_bytes == 1 << 30 and settings.verbose
    assert settings.profiling_verbosity == "DETAILED"  # the layer JSON needs it
    with pytest.raises(ControlNetRTError, match="workspace"):
        build_settings(get_profile("256x384-fp16"), "vae_decoder", 768, 320, "/tmp", BuildOptions(workspace_bytes=0))


def test_timing_cache_path(tmp_path):
    profile = get_profile("256x384-fp16")
    default = build_settings(profile, "fused_step", 768, 320, tmp_path / "plans")
    assert default.timing_cache == tmp_path / "plans" / "timing.cache"
    shared = tmp_path / "shared.cache"
    assert build_settings(profile, "fused_step", 768, 320, tmp_path / "plans",
                          BuildOptions(timing_cache=shared)).timing_cache == shared
    assert timing_cache_path(tmp_path, BuildOptions()) == tmp_path / "timing.cache"
    assert plan_path(tmp_path, "fused_step") == tmp_path / "fused_step.plan"


def test_settings_key_is_json_and_ignores_cache_location(tmp_path):
    profile = get_profile("256x384-fp16")
    a = build_settings(profile, "fused_step", 768, 320, tmp_path / "a")
    b = build_settings(profile, "fused_step", 768, 320, tmp_path / "b", BuildOptions(verbose=True))
    assert a.as_key() == b.as_key()  # where the timing cache lives and log verbosity do not change the plan
    key = a.as_key()
    assert json.loads(json.dumps(key)) == key
    assert key["input_shapes"]["x"] == [1, 4, 32, 48]
    c = build_settings(replace(profile, trt_optimization_level=5), "fused_step", 768, 320, tmp_path / "a")
    assert c.as_key() != key


def test_dtype_table():
    assert TRT_TO_TORCH["FLOAT"] is torch.float32
    assert TRT_TO_TORCH["HALF"] is torch.float16
    assert TRT_TO_TORCH["INT64"] is torch.int64  # text encoder input_ids
    assert TRT_TO_TORCH["UINT8"] is torch.uint8  # vae decoder image
    assert TRT_TO_TORCH["BF16"] is torch.bfloat16 and TRT_TO_TORCH["INT32"] is torch.int32
    assert TRT_TO_TORCH["BOOL"] is torch.bool and TRT_TO_TORCH["INT8"] is torch.int8
    for name, dtype in TRT_TO_TORCH.items():
        assert torch_dtype(name) is dtype
        assert TORCH_TO_TRT[dtype] == name and trt_dtype_name(dtype) == name
    # Every dtype of the I/O contract has a TensorRT type.
    for io in network_io(get_profile("256x384-fp16"), 768, 320).values():
        for spec in io.values():
            assert trt_dtype_name(spec.dtype) in TRT_TO_TORCH


def test_dtype_names_and_unknowns():
    assert trt_type_name("DataType.HALF") == "HALF"  # str() of a pybind11 enum member
    with pytest.raises(ControlNetRTError, match="no torch equivalent"):
        torch_dtype("INT4")
    with pytest.raises(ControlNetRTError, match="no TensorRT equivalent"):
        trt_dtype_name(torch.complex64)


def test_tensorrt_available_gives_one_line():
    ok, why = tensorrt_available()
    assert isinstance(ok, bool) and why and "\n" not in why
    try:
        import tensorrt  # noqa: F401

        importable = True
    except Exception:
        importable = False
    if not importable:
        assert not ok and "pip install tensorrt" in why
    elif not torch.cuda.is_available():
        assert not ok and "no CUDA GPU" in why
    else:
        assert ok == (int(tensorrt.__version__.split(".")[0]) >= 10)


def test_import_does_not_import_tensorrt():
    code = ("import sys, engines.tensorrt, engines.tensorrt.plans, engines.tensorrt.onnx_io; "
            "print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(tensorrt_available()[0], reason="TensorRT is usable here")
def test_entry_points_fail_with_the_availability_message(tmp_path):
    import engines.tensorrt as trt_backend

    why = tensorrt_available()[1]
    profile = get_profile("256x384-fp16")
    calls = [
        lambda: trt_backend.build_tensorrt_plans(tmp_path / "onnx", tmp_path / "plans", profile),
        lambda: trt_backend.build_tensorrt_engines(tmp_path / "plans", profile),
        lambda: trt_backend.refit_plan(tmp_path / "a.plan", tmp_path / "a.onnx"),
        lambda: trt_backend.load_engine(tmp_path / "a.plan"),
    ]
    for call in calls:
        with pytest.raises(ControlNetRTError) as info:
            call()
        assert str(info.value) == why

"""Configuration resolution (flags > CNRT_* variables > GPU/CPU defaults) and the script's one-line errors."""

import pytest

import compute_score
from profiles.config import Backend, Precision, Profile
from profiles.errors import ControlNetRTError
from scoring.config import ProcessArgs, resolve_config


def test_cpu_defaults_are_the_tiny_fp32_model_and_say_so():
    config = resolve_config(env={}, cuda_available=False)
    assert (config.weights, config.profile.name, config.device, config.num_images) == (
        "synthetic-tiny", "256x384-fp32", "cpu", 4)
    assert config.backend is Backend.AUTO and config.reference
    assert any("no GPU" in note and "synthetic-tiny" in note for note in config.notes)
    assert config.reference_profile == "256x384-fp32"


def test_gpu_defaults_follow_the_hackathon():
    config = resolve_config(env={}, cuda_available=True)
    assert (config.weights, config.profile.name, config.device, config.num_images) == (
        "synthetic", "256x384-fp16", "cuda", 20)
    assert config.profile_arg == "256x384-fp16" and config.reference_profile == "256x384-fp32"


def test_flags_beat_environment_which_beats_defaults():
    env = {"CNRT_WEIGHTS": "synthetic-tiny:3", "CNRT_PROFILE": "256x384-fp32", "CNRT_BACKEND": "torch",
           "CNRT_DEVICE": "cpu"}
    config = resolve_config(env=env, cuda_available=True)
    assert (config.weights, config.profile.name, config.backend, config.device) == (
        "synthetic-tiny:3", "256x384-fp32", Backend.TORCH, "cpu")
    assert config.num_images == 4 and not any("weights '" in n for n in config.notes)
    config = resolve_config(weights="synthetic", backend="onnxruntime", num_images=2, env=env, cuda_available=True)
    assert (config.weights, config.backend, config.num_images, config.num_images_exact) == (
        "synthetic", Backend.ONNXRUNTIME, 2, True)


def test_process_args_are_the_hackathon_call():
    args = ProcessArgs()
    assert args.positional() == ("a bird", "best quality, extremely detailed",
                                 "longbody, lowres, bad anatomy, bad hands, missing fingers", 1, 256, 20, False, 1, 9,
                                 2946901, 0.0, 100, 200)
    config = resolve_config(profile="256x384-fp16-x2", env={}, cuda_available=True)
    assert config.process.num_samples == 2 and config.process.image_resolution == 256
    assert config.reference_profile == Profile("256x384-fp32", 256, 384, Precision.FP32, num_samples=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(profile="nope"), "unknown profile"),
    (dict(backend="tensorflow"), "unknown backend"),
    (dict(device="cuda"), "no CUDA GPU"),
    (dict(num_images=0), "at least 1"),
    (dict(inception_weights="/nonexistent/pt_inception.pth"), "is not a file"),
    (dict(images="/nonexistent/dir"), "is not a directory"),
])
def test_user_mistakes_raise_the_project_error(kwargs, match):
    with pytest.raises(ControlNetRTError, match=match):
        resolve_config(env={}, cuda_available=False, **kwargs)


def test_script_prints_one_line_and_exits_nonzero(capsys):
    assert compute_score.main(["--device", "cpu", "--profile", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("compute_score: error: unknown profile 'nope'")

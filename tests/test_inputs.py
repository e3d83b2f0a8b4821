"""Bad input gets ControlNetRTError with a message that names the fix, before any work is done."""

from __future__ import annotations

import numpy as np
import pytest

from canny2image_TRT import hackathon
from profiles import ControlNetRTError, get_profile

GOOD = dict(prompt="a bird", a_prompt="best", n_prompt="bad", num_samples=1, image_resolution=256,
            ddim_steps=20, guess_mode=False, strength=1, scale=9, seed=1, eta=0.0, low_threshold=100,
            high_threshold=200)


def _call(hk, image, **overrides):
    a = dict(GOOD, **overrides)
    return hk.process(image, *a.values())


@pytest.fixture(scope="module")
def hk(weights_cache):
    h = hackathon()
    h.initialize(weights="synthetic-tiny", profile="256x384-fp32", backend="torch", device="cpu",
                 build_root=weights_cache.parent / "build-inputs")
    return h


IMAGE = np.zeros((256, 384, 3), np.uint8)


@pytest.mark.parametrize("image, match", [
    (IMAGE.astype(np.float32), "uint8"),
    (IMAGE[None], "shape"),
    (np.zeros((256, 384, 5), np.uint8), "shape"),
    ([[0, 1]], "numpy array"),
    (np.zeros((4, 4, 3), np.uint8), "too small"),
    (np.zeros((300, 300, 3), np.uint8), "profile 256x384-fp32 serves 256x384"),
])
def test_bad_images(hk, image, match):
    with pytest.raises(ControlNetRTError, match=match):
        _call(hk, image)


@pytest.mark.parametrize("overrides, match", [
    (dict(num_samples=2), "256x384-fp16-x2"),
    (dict(ddim_steps=30), "built for 20"),
    (dict(eta=0.5), "eta"),
    (dict(scale=float("nan")), "finite"),
    (dict(image_resolution=512), "becomes 512x768"),
])
def test_bad_arguments(hk, overrides, match):
    with pytest.raises(ControlNetRTError, match=match):
        _call(hk, IMAGE, **overrides)


def test_gray_and_rgba_images_are_accepted(hk):
    gray = np.full((256, 384), 128, np.uint8)
    rgba = np.dstack([IMAGE, np.full((256, 384), 255, np.uint8)])
    hk.runtime.check_request(gray, 1, 256, 20, 0.0, 9, 1)
    hk.runtime.check_request(rgba, 1, 256, 20, 0.0, 9, 1)


def test_unknown_profile_backend_weights(tmp_path):
    with pytest.raises(ControlNetRTError, match="unknown profile"):
        get_profile("999x999-fp8")
    for kwargs, match in [
        (dict(profile="nope"), "unknown profile"),
        (dict(backend="cuda-magic"), "unknown backend"),
        (dict(weights=str(tmp_path / "missing.pth")), "not found"),
        (dict(weights="synthetic-tiny:abc"), "bad synthetic seed"),
        (dict(device="cuda:0"), "no CUDA GPU") if not __import__("torch").cuda.is_available() else
        (dict(profile="nope"), "unknown profile"),
        (dict(profile="256x384-fp16", device="cpu", weights="synthetic-tiny"), "needs a CUDA GPU"),
    ]:
        args = dict(weights="synthetic-tiny", profile="256x384-fp32", backend="torch", device="cpu",
                    build_root=tmp_path / "build")
        args.update(kwargs)
        with pytest.raises(ControlNetRTError, match=match):
            hackathon().initialize(**args)


def test_incomplete_and_corrupt_weights_folders(tmp_path, tiny_weights_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_weights_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ControlNetRTError, match="vae/config.json"):
        hackathon().initialize(weights=str(broken), profile="256x384-fp32", device="cpu", build_root=tmp_path / "b")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_weights_dir, corrupt)
    for f in (corrupt / "unet").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(ControlNetRTError, match="cannot load .*unet"):
        hackathon().initialize(weights=str(corrupt), profile="256x384-fp32", device="cpu", build_root=tmp_path / "b")
    bad_suffix = tmp_path / "weights.bin"
    bad_suffix.write_bytes(b"x")
    with pytest.raises(ControlNetRTError, match="unknown suffix"):
        hackathon().initialize(weights=str(bad_suffix), profile="256x384-fp32", device="cpu",
                               build_root=tmp_path / "b")


def test_env_variables_feed_the_no_argument_call(monkeypatch, tmp_path):
    monkeypatch.setenv("CNRT_WEIGHTS", "synthetic-tiny")
    monkeypatch.setenv("CNRT_PROFILE", "256x384-fp32")
    monkeypatch.setenv("CNRT_DEVICE", "cpu")
    monkeypatch.setenv("CNRT_BUILD_DIR", str(tmp_path))
    h = hackathon()
    h.initialize()
    assert h.runtime.profile.name == "256x384-fp32" and h.runtime.device.type == "cpu"
    assert h.runtime.bundle.source == "synthetic-tiny"


def test_device_hint_equals_the_host_hint_bit_for_bit():
    """The runtime uploads the uint8 edge map and makes the float hint on the device; that must be canny_hint's."""
    import torch

    from pipeline.preprocess import canny_edges, canny_hint, edges_to_hint

    rng = np.random.default_rng(0)
    image = (rng.random((300, 420, 3)) * 255).astype(np.uint8)
    image[100:200, 50:300] = 255  # strong edges as well as noise
    detected, hint = canny_hint(image, 256, 100, 200)
    edges = canny_edges(image, 256, 100, 200)
    assert edges.shape == (256, 384) and set(np.unique(edges)) <= {0, 255} and edges.any()
    device_hint = edges_to_hint(torch.from_numpy(edges), 2)
    assert device_hint.shape == (2, 3, 256, 384) and device_hint.dtype == torch.float32
    assert torch.equal(device_hint, torch.from_numpy(np.repeat(hint, 2, axis=0)))
    with pytest.raises(ValueError, match="uint8"):
        edges_to_hint(torch.from_numpy(edges).float(), 1)


def test_last_hint_map_is_the_originals_detected_map(hk):
    from pipeline.preprocess import canny_hint

    image = (np.random.default_rng(1).random((256, 384, 3)) * 255).astype(np.uint8)
    _call(hk, image)
    np.testing.assert_array_equal(hk.runtime.last_hint_map, canny_hint(image, 256, 100, 200)[0])

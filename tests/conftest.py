"""Shared fixtures: one tiny synthetic weights cache per session, and the `gpu` marker."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine); skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Torch on one thread for the whole session. The tiny networks gain nothing from threads, and on a shared
    2-core CI machine torch's OpenMP workers thrash (measured: one 64x64 tiny step 8.9 s with 2 threads under load
    vs 0.03 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def weights_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("weights-cache")


@pytest.fixture(scope="session")
def tiny_bundle(weights_cache):
    from models import load_bundle

    return load_bundle("synthetic-tiny", cache_root=weights_cache)


@pytest.fixture(scope="session")
def bundle(tiny_bundle):
    """The tiny bundle under the name the surgery / onnxruntime tests use (never mutated by them)."""
    return tiny_bundle


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory):
    """A diffusers-format folder (unet/ controlnet/ vae/ text_encoder/) made outside the repo by save_pretrained."""
    from models.synthetic import build_networks

    folder = tmp_path_factory.mktemp("tiny-diffusers-folder")
    for name, net in build_networks("tiny", seed=7).items():
        net.save_pretrained(folder / name)
    return folder

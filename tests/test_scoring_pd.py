"""PD score plumbing that runs without pytorch-fid: the unavailable messages, the distance, the image input and
the offline weights hand-over to torch.hub. The Inception forward itself needs torchvision (GPU machine only)."""

import importlib.util

import cv2
import numpy as np
import pytest
import torch

from scoring.pd import FID_WEIGHTS_FILE, PDUnavailable, _hub_checkpoint, fid_input, load_pd_scorer, pd_distance

FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"


def _torchvision_importable():
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def test_without_weights_file_pd_is_unavailable():
    result = load_pd_scorer(None, "cpu")
    assert isinstance(result, PDUnavailable)
    assert result.message.startswith("PD unavailable: no --inception-weights FILE given")


@pytest.mark.skipif(_torchvision_importable(), reason="torchvision is importable here; this checks CPU CI without it")
def test_without_torchvision_pd_is_unavailable_with_reason(tmp_path):
    weights = tmp_path / FID_WEIGHTS_FILE
    torch.save({"w": torch.zeros(1)}, weights)
    result = load_pd_scorer(weights, "cpu")
    assert isinstance(result, PDUnavailable)
    assert result.message.startswith("PD unavailable: pytorch-fid needs torchvision, which is not importable here")
    assert "\n" not in result.message


def test_pd_is_the_l2_distance_of_features():
    a = np.zeros(2048)
    b = np.zeros(2048)
    b[:4] = [3.0, 4.0, 0.0, 12.0]
    assert pd_distance(a, b) == pytest.approx(13.0)
    assert pd_distance(b, b) == 0.0


def test_fid_input_is_pil_rgb_scaled_like_to_tensor(tmp_path):
    bgr = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    path = tmp_path / "x.png"  # lossless, so the expected values are exact
    cv2.imwrite(str(path), bgr)
    x = fid_input(path)
    assert x.shape == (1, 3, 16, 24) and x.dtype == torch.float32
    expected = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1).float().div(255)
    assert torch.equal(x[0], expected)


def test_user_weights_are_served_to_load_state_dict_from_url_offline(tmp_path):
    user_file = tmp_path / "my_inception.pth"  # any name: the hub folder gives it the URL's name
    state = {"conv.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, user_file)
    before = torch.hub.get_dir()
    with _hub_checkpoint(user_file, FID_WEIGHTS_FILE):
        loaded = torch.hub.load_state_dict_from_url(FID_URL, progress=False)  # no network here: must not download
    assert torch.equal(loaded["conv.weight"], state["conv.weight"])
    assert torch.hub.get_dir() == before

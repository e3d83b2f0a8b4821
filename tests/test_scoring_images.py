"""The generated test images: 20, exactly 256x384 BGR uint8, byte-identical when made again; user folders."""

import hashlib

import cv2
import numpy as np
import pytest

from artifacts import Manifest
from profiles.errors import ControlNetRTError
from scoring.images import (NUM_TEST_IMAGES, SKIMAGE_SOURCES, ensure_test_images, fit_to_size, list_image_files,
                            load_test_images)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("test_images")
    return root, ensure_test_images(root)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.jpg"))}


def test_twenty_images_of_the_hackathon_shape(generated):
    root, folder = generated
    assert len(SKIMAGE_SOURCES) == NUM_TEST_IMAGES == 20
    images = load_test_images(20, cache_root=root)
    assert [im.name for im in images] == [f"bird_{i}" for i in range(20)]
    for im in images:
        assert im.bgr.shape == (256, 384, 3) and im.bgr.dtype == np.uint8
        assert im.bgr.std() > 5, f"{im.source} is nearly flat"
    assert len({hashlib.sha256(im.bgr.tobytes()).hexdigest() for im in images}) == 20


def test_generation_is_deterministic_bytes(generated, tmp_path):
    _, folder = generated
    again = ensure_test_images(tmp_path)
    assert _digests(again) == _digests(folder)
    assert len(_digests(folder)) == 20


def test_images_are_bgr_like_cv2_imread(generated):
    root, folder = generated
    # chelsea (bird_1) is an orange cat: red dominates blue in RGB, so channel 2 > channel 0 in BGR.
    cat = load_test_images(2, cache_root=root)[1].bgr.astype(np.float64)
    assert cat[..., 2].mean() > cat[..., 0].mean() + 10
    np.testing.assert_array_equal(cv2.imread(str(folder / "bird_1.jpg")), cat.astype(np.uint8))


def test_stale_or_damaged_set_is_regenerated(tmp_path):
    folder = ensure_test_images(tmp_path)
    good = _digests(folder)
    (folder / "bird_3.jpg").write_bytes(b"truncated")
    (folder / "bird_7.jpg").unlink()
    assert ensure_test_images(tmp_path) == folder
    assert _digests(folder) == good
    manifest = Manifest.load(folder)
    assert manifest is not None and len(manifest.artifacts) == 20


def test_other_sizes_follow_the_profile(tmp_path):
    images = load_test_images(3, cache_root=tmp_path, height=384, width=256)
    assert all(im.bgr.shape == (384, 256, 3) for im in images)


def test_fit_to_size_crops_centre_then_resizes():
    wide = np.zeros((100, 400, 3), np.uint8)
    wide[:, 125:275] = 200  # the centre 150 columns = a 3:2 crop of height 100
    out = fit_to_size(wide, 256, 384)
    assert out.shape == (256, 384, 3)
    assert out[:, 4:-4].min() == 200


def test_user_folder_hackathon_names_in_numeric_order(tmp_path):
    for i in range(12):
        cv2.imwrite(str(tmp_path / f"bird_{i}.jpg"), np.full((256, 384, 3), i * 10, np.uint8))
    files = list_image_files(tmp_path)
    assert [p.name for p in files[:3]] == ["bird_0.jpg", "bird_1.jpg", "bird_2.jpg"] and len(files) == 12
    images = load_test_images(11, folder=tmp_path)
    assert images[10].name == "bird_10" and abs(int(images[10].bgr.mean()) - 100) <= 1
    with pytest.raises(ControlNetRTError, match="--num-images 12"):
        load_test_images(13, folder=tmp_path)
    assert len(load_test_images(20, folder=tmp_path, exact=False)) == 12


def test_user_folder_errors(tmp_path):
    with pytest.raises(ControlNetRTError, match="holds no images"):
        load_test_images(2, folder=tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ControlNetRTError, match="cannot read image"):
        load_test_images(1, folder=tmp_path)
    with pytest.raises(ControlNetRTError, match="--images DIR"):
        load_test_images(21, cache_root=tmp_path)

"""The test images: 20 pictures bundled with scikit-image, or a user's folder (e.g. the hackathon's bird_*.jpg).

The hackathon's pictures are not redistributable, so the default set is made once from `skimage.data` (files in
the scikit-image wheel, no download): centre-cropped to the profile's aspect ratio, resized to exactly H x W,
converted to BGR and written as JPEG (quality 95) under build/test_images/<H>x<W>/bird_{i}.jpg, the names the
hackathon uses, so a generated folder and the real one are interchangeable. They are keyed in a Manifest and
regenerated only when missing, altered or made by other library versions. Every image the harness uses is read
back with cv2.imread, exactly as the original compute_score.py reads its inputs (BGR, uint8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts import Manifest, atomic_file, library_versions
from profiles.errors import ControlNetRTError

GENERATOR_VERSION = 1
NUM_TEST_IMAGES = 20
JPEG_QUALITY = 95  # OpenCV's default, which the original's cv2.imwrite used
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# skimage.data loaders whose files ship inside the scikit-image wheel (no pooch download), colour ones first.
SKIMAGE_SOURCES = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "logo", "stereo_motorcycle", "camera", "brick", "cell", "clock", "coins", "grass", "gravel",
    "moon", "page", "text",
)


@dataclass(frozen=True)
class InputImage:
    name: str  # file stem, e.g. "bird_3"; result files reuse it
    path: Path
    bgr: np.ndarray  # (H, W, 3) uint8 as cv2.imread returns it
    source: str  # where the picture came from


def _as_rgb_uint8(picture: np.ndarray) -> np.ndarray:
    if picture.dtype != np.uint8:
        raise ValueError(f"expected uint8 picture, got {picture.dtype}")
    if picture.ndim == 2:
        return np.repeat(picture[:, :, None], 3, axis=2)
    if picture.shape[2] == 4:
        # Composite over white, as ControlNet's HWC3 does for RGBA.
        color = picture[:, :, :3].astype(np.float32)
        alpha = picture[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return picture


def _load_skimage(name: str) -> np.ndarray:
    from skimage import data

    picture = getattr(data, name)()
    if name == "stereo_motorcycle":
        picture = picture[0]  # (left, right, disparity)
    return _as_rgb_uint8(picture)


def fit_to_size(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize to exactly (height, width)."""
    import cv2

    h, w = rgb.shape[:2]
    if w * height > h * width:  # too wide: crop columns
        crop_w = max(1, round(h * width / height))
        x0 = (w - crop_w) // 2
        rgb = rgb[:, x0:x0 + crop_w]
    else:
        crop_h = max(1, round(w * height / width))
        y0 = (h - crop_h) // 2
        rgb = rgb[y0:y0 + crop_h]
    shrinking = rgb.shape[0] >= height
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    return cv2.resize(np.ascontiguousarray(rgb), (width, height), interpolation=interpolation)


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an array that cv2 treats as BGR (the same bytes cv2.imwrite(".jpg") writes)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ControlNetRTError(f"OpenCV could not encode a {image.shape} {image.dtype} image as JPEG")
    return buf.tobytes()


def encode_png(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ControlNetRTError(f"OpenCV could not encode a {image.shape} {image.dtype} image as PNG")
    return buf.tobytes()


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(payload)


def _manifest_key(height: int, width: int) -> dict:
    import cv2
    import skimage

    return {"generator": GENERATOR_VERSION, "size": [height, width], "count": NUM_TEST_IMAGES,
            "scikit-image": skimage.__version__, "opencv": cv2.__version__, **library_versions(("numpy",))}


def test_image_dir(cache_root: Path, height: int, width: int) -> Path:
    return Path(cache_root) / f"{height}x{width}"


def ensure_test_images(cache_root: Path, height: int = 256, width: int = 384) -> Path:
    """Make the 20 JPEGs once; return their folder. Stale or partial sets are regenerated."""
    folder = test_image_dir(cache_root, height, width)
    key = _manifest_key(height, width)
    roles = [f"bird_{i}" for i in range(NUM_TEST_IMAGES)]
    manifest = Manifest.load(folder)
    if manifest is not None and manifest.is_fresh(folder, key, roles):
        return folder
    manifest = Manifest(key)
    for role, source in zip(roles, SKIMAGE_SOURCES):
        bgr = fit_to_size(_load_skimage(source), height, width)[:, :, ::-1]
        path = folder / f"{role}.jpg"
        write_bytes_atomic(path, encode_jpeg(np.ascontiguousarray(bgr)))
        manifest.record(folder, role, path)
    manifest.save(folder)
    return folder


def read_image(path: Path, source: "str | None" = None) -> InputImage:
    import cv2

    bgr = cv2.imread(str(path))  # BGR uint8, as the original compute_score.py reads bird_{i}.jpg
    if bgr is None:
        raise ControlNetRTError(f"cannot read image {path}: pass a folder of JPEG/PNG files to --images")
    return InputImage(name=path.stem, path=path, bgr=bgr, source=source or str(path))


def list_image_files(folder: Path) -> list[Path]:
    """bird_0.jpg, bird_1.jpg ... in numeric order when the folder follows the hackathon's names, else sorted."""
    birds = []
    while (folder / f"bird_{len(birds)}.jpg").is_file():
        birds.append(folder / f"bird_{len(birds)}.jpg")
    if birds:
        return birds
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_test_images(count: int, *, folder: "Path | None" = None, cache_root: "Path | None" = None,
                     height: int = 256, width: int = 384, exact: bool = True) -> list[InputImage]:
    """`count` images from `folder`, or from the generated set when folder is None.

    exact=False (the count was a default) takes fewer when fewer exist; exact=True makes that an error.
    """
    if folder is None:
        if count > NUM_TEST_IMAGES:
            raise ControlNetRTError(f"--num-images {count}: the generated set has {NUM_TEST_IMAGES} images; "
                                    "pass --images DIR for more")
        gen = ensure_test_images(cache_root, height, width)
        return [read_image(gen / f"bird_{i}.jpg", source=f"skimage.data.{SKIMAGE_SOURCES[i]}") for i in range(count)]
    files = list_image_files(Path(folder))
    if not files:
        raise ControlNetRTError(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                                "pass the folder with bird_0.jpg ... bird_19.jpg")
    if len(files) < count and exact:
        raise ControlNetRTError(f"--images {folder} holds {len(files)} images but --num-images is {count}: "
                                f"pass --num-images {len(files)} or add images")
    return [read_image(p) for p in files[:count]]

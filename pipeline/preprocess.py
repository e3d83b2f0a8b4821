"""Input checks and the canny hint, exactly as ControlNet's gradio_canny2image / annotator code.

HWC3 -> resize_image (short side to image_resolution, each side rounded to a multiple of 64, INTER_LANCZOS4 when
upscaling else INTER_AREA) -> cv2.Canny on the given (BGR) image -> HWC3 -> /255 -> NCHW float32.

The runtime stops at the one-channel edge map on the host (`canny_edges`) and makes the float hint on the device
(`edges_to_hint`, inside the hint stage's CUDA graph): a 96 KiB upload instead of 1.2 MiB and no host-side
float conversion. `canny_hint` is the original's host-side float hint, which the device path must equal bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from profiles.errors import ControlNetRTError


def check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ControlNetRTError(f"input_image must be a numpy array (cv2.imread output), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ControlNetRTError(f"input_image must be uint8, got {image.dtype}: convert with .astype(np.uint8)")
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ControlNetRTError(f"input_image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
    if min(image.shape[:2]) < 8:
        raise ControlNetRTError(f"input_image {image.shape[:2]} is too small")
    return image


def hwc3(x: np.ndarray) -> np.ndarray:
    """annotator.util.HWC3: gray -> 3 channels; RGBA -> composited over white; 3 channels unchanged."""
    if x.ndim == 2:
        x = x[:, :, None]
    c = x.shape[2]
    if c == 3:
        return x
    if c == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    y = color * alpha + 255.0 * (1.0 - alpha)
    return y.clip(0, 255).astype(np.uint8)


def resized_shape(height: int, width: int, resolution: int) -> tuple[int, int]:
    k = float(resolution) / min(height, width)
    return int(np.round(height * k / 64.0)) * 64, int(np.round(width * k / 64.0)) * 64


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """annotator.util.resize_image."""
    import cv2

    h, w = image.shape[:2]
    k = float(resolution) / min(h, w)
    new_h, new_w = resized_shape(h, w, resolution)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def canny_edges(image: np.ndarray, resolution: int, low_threshold: int, high_threshold: int) -> np.ndarray:
    """-> the Canny edge map, H x W uint8 in {0, 255} (HWC3 of it is the original's `detected_map`)."""
    import cv2

    img = resize_image(hwc3(check_image(image)), resolution)
    return cv2.Canny(img, int(low_threshold), int(high_threshold))


def canny_hint(image: np.ndarray, resolution: int, low_threshold: int, high_threshold: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """-> (edge map HxWx3 uint8 {0,255}, hint (1, 3, H, W) float32 in {0, 1}), all on the host as the original."""
    detected = hwc3(canny_edges(image, resolution, low_threshold, high_threshold))
    hint = (detected.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
    return detected, hint


def edges_to_hint(edges: torch.Tensor, batch: int) -> torch.Tensor:
    """(H, W) uint8 edge map (any device) -> hint (batch, 3, H, W) float32: HWC3, /255 and NCHW as `canny_hint`."""
    if edges.dtype != torch.uint8 or edges.dim() != 2:
        raise ValueError(f"edges must be an (H, W) uint8 map, got {tuple(edges.shape)} {edges.dtype}")
    return (edges.float() / 255.0).expand(batch, 3, *edges.shape).contiguous()

"""Typed, named static build profiles.

A profile fixes everything a static-shape engine or a captured CUDA graph bakes in: image size, number of samples,
precision and step count. Engines and graphs are keyed on the profile name, so changing any of these means a new
profile (and a rebuild), never a silent reshape.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from profiles.errors import ControlNetRTError

LATENT_CHANNELS = 4
VAE_SCALE = 8  # pixels per latent cell
NUM_CONTROLS = 13  # 12 down residuals + 1 mid residual of the SD1.5 ControlNet


def env_flag(name: str, default: bool) -> bool:
    """A boolean switch from the environment: unset gives the default; 0 / false / no / off / empty mean off."""
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


def parse_choice(cls: type[enum.Enum], value, what: str):
    """`cls(value)`, or ControlNetRTError listing the valid choices."""
    try:
        return cls(value)
    except ValueError:
        raise ControlNetRTError(f"unknown {what} {value!r}: choose one of {', '.join(m.value for m in cls)}") from None


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def torch_dtype(self):
        import torch

        return torch.float32 if self is Precision.FP32 else torch.float16


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"

    @classmethod
    def parse(cls, value: "str | Backend") -> "Backend":
        return parse_choice(cls, value, "backend")


@dataclass(frozen=True)
class Profile:
    """One static shape set. `height`/`width` are the image size in pixels (multiples of 64)."""

    name: str
    height: int
    width: int
    precision: Precision
    num_samples: int = 1
    ddim_steps: int = 20
    # TensorRT builder optimisation level (0-5); other backends ignore it.
    trt_optimization_level: int = 3

    def __post_init__(self):
        if self.height % 64 or self.width % 64:
            raise ControlNetRTError(f"profile {self.name}: height and width must be multiples of 64")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.num_samples, LATENT_CHANNELS, self.height // VAE_SCALE, self.width // VAE_SCALE)

    @property
    def cfg_batch(self) -> int:
        """Batch of the fused step: [cond] * num_samples + [uncond] * num_samples."""
        return 2 * self.num_samples

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)


def _standard_profiles() -> dict[str, Profile]:
    profiles = [
        Profile("256x384-fp16", 256, 384, Precision.FP16),
        Profile("256x384-fp32", 256, 384, Precision.FP32),
        Profile("384x256-fp16", 384, 256, Precision.FP16),
        Profile("512x512-fp16", 512, 512, Precision.FP16),
        Profile("256x384-fp16-x2", 256, 384, Precision.FP16, num_samples=2),
    ]
    return {p.name: p for p in profiles}


PROFILES: dict[str, Profile] = _standard_profiles()
DEFAULT_PROFILE = "256x384-fp16"
REFERENCE_PROFILE = "256x384-fp32"


def get_profile(name: "str | Profile") -> Profile:
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ControlNetRTError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} (or add one in profiles/config.py)"
        ) from None


def reference_of(profile: Profile) -> Profile:
    """The fp32 profile with the same shapes: the ground truth a profile is scored against."""
    from dataclasses import replace

    return replace(profile, name=f"{profile.height}x{profile.width}-fp32", precision=Precision.FP32)

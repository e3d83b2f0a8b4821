"""The score harness's configuration, resolved in one place.

compute_score.py hands over what the user typed (None for "not given"); `resolve_config` fills the rest from the
CNRT_* environment variables that the no-argument `hackathon().initialize()` also reads, then from defaults that
depend on whether a GPU is present. A CPU-only machine gets the tiny synthetic model in fp32 and fewer images, so
a run finishes in minutes; every such choice is recorded in `notes` so the run says what it did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from profiles.config import PROFILES, Backend, Profile, get_profile, reference_of
from profiles.errors import ControlNetRTError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "out" / "score"
DEFAULT_IMAGE_CACHE = REPO_ROOT / "build" / "test_images"

GPU_DEFAULTS = {"weights": "synthetic", "profile": "256x384-fp16", "num_images": 20}
CPU_DEFAULTS = {"weights": "synthetic-tiny", "profile": "256x384-fp32", "num_images": 4}


@dataclass(frozen=True)
class ProcessArgs:
    """The arguments compute_score.py of the hackathon passes to process(), in order (design.md part 2 (a))."""

    prompt: str = "a bird"
    a_prompt: str = "best quality, extremely detailed"
    n_prompt: str = "longbody, lowres, bad anatomy, bad hands, missing fingers"
    num_samples: int = 1
    image_resolution: int = 256
    ddim_steps: int = 20
    guess_mode: bool = False
    strength: float = 1
    scale: float = 9
    seed: int = 2946901
    eta: float = 0.0
    low_threshold: int = 100
    high_threshold: int = 200

    def positional(self) -> tuple:
        """Everything after input_image, positionally, as the original script calls it."""
        return (self.prompt, self.a_prompt, self.n_prompt, self.num_samples, self.image_resolution,
                self.ddim_steps, self.guess_mode, self.strength, self.scale, self.seed, self.eta,
                self.low_threshold, self.high_threshold)


@dataclass(frozen=True)
class ScoreConfig:
    weights: str
    profile: Profile
    backend: Backend
    device: str
    num_images: int
    out: Path
    process: ProcessArgs
    images: "Path | None" = None  # None: the generated test images
    image_cache: Path = DEFAULT_IMAGE_CACHE
    inception_weights: "Path | None" = None
    reference: bool = True
    trace: "Path | None" = None
    grid_rows: int = 4
    # False when num_images is a default: a user's folder with fewer images is then used whole.
    num_images_exact: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def profile_arg(self) -> "Profile | str":
        return _initialize_arg(self.profile)

    @property
    def reference_profile(self) -> "Profile | str":
        """The fp32 profile of the same shapes, the ground truth this profile is scored against."""
        return _initialize_arg(reference_of(self.profile))


def _initialize_arg(profile: Profile) -> "Profile | str":
    """initialize() takes profile names; a profile that is not registered (e.g. a test's) goes as the object."""
    return profile.name if PROFILES.get(profile.name) == profile else profile


def _first(*values):
    return next((v for v in values if v not in (None, "")), None)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_config(*, weights: "str | None" = None, profile: "str | Profile | None" = None,
                   backend: "str | None" = None, device: "str | None" = None, images: "str | Path | None" = None,
                   num_images: "int | None" = None, out: "str | Path | None" = None,
                   inception_weights: "str | Path | None" = None, reference: bool = True,
                   trace: "str | Path | None" = None, image_cache: "str | Path | None" = None,
                   env: "Mapping[str, str] | None" = None, cuda_available: "bool | None" = None) -> ScoreConfig:
    """Flags win over CNRT_* variables, which win over GPU / CPU defaults."""
    env = os.environ if env is None else env
    cuda_available = _cuda_available() if cuda_available is None else cuda_available
    notes: list[str] = []

    device = device or env.get("CNRT_DEVICE") or "auto"
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device.startswith("cuda") and not cuda_available:
        raise ControlNetRTError(f"--device {device} requested but no CUDA GPU is visible: pass --device cpu")
    defaults = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS

    chosen_weights = _first(weights, env.get("CNRT_WEIGHTS"))
    chosen_profile = _first(profile, env.get("CNRT_PROFILE"))
    defaulted = []
    if chosen_weights is None:
        chosen_weights = defaults["weights"]
        defaulted.append(f"weights {chosen_weights!r}")
    if chosen_profile is None:
        chosen_profile = defaults["profile"]
        defaulted.append(f"profile {chosen_profile!r}")
    num_images_exact = num_images is not None
    if num_images is None:
        num_images = defaults["num_images"]
        defaulted.append(f"{'at most ' if images is not None else ''}{num_images} images")
    if defaulted:
        where = "a GPU" if device.startswith("cuda") else "no GPU"
        notes.append(f"{where}: using {', '.join(defaulted)} by default "
                     "(pass --weights / --profile / --num-images to choose)")

    resolved_profile = get_profile(chosen_profile)
    resolved_backend = Backend.parse(_first(backend, env.get("CNRT_BACKEND"), Backend.AUTO.value))
    if num_images < 1:
        raise ControlNetRTError(f"--num-images {num_images}: need at least 1 (the first call is the warm-up)")
    if num_images == 1:
        notes.append("one image only: its call is the warm-up, so no latency is reported")

    if inception_weights is not None:
        inception_weights = Path(inception_weights).expanduser()
        if not inception_weights.is_file():
            raise ControlNetRTError(f"--inception-weights {inception_weights} is not a file: pass pytorch-fid's "
                                    "FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    if images is not None:
        images = Path(images).expanduser()
        if not images.is_dir():
            raise ControlNetRTError(f"--images {images} is not a directory: pass the folder holding bird_0.jpg ...")

    # The image size follows the profile; image_resolution is its short side (256 for the hackathon's 256x384).
    process = ProcessArgs(num_samples=resolved_profile.num_samples,
                          image_resolution=min(resolved_profile.height, resolved_profile.width),
                          ddim_steps=resolved_profile.ddim_steps)
    return ScoreConfig(
        weights=str(chosen_weights), profile=resolved_profile, backend=resolved_backend, device=device,
        num_images=int(num_images), num_images_exact=num_images_exact,
        out=Path(out).expanduser() if out is not None else DEFAULT_OUT, process=process, images=images,
        image_cache=Path(image_cache) if image_cache is not None else DEFAULT_IMAGE_CACHE,
        inception_weights=inception_weights, reference=reference,
        trace=Path(trace).expanduser() if trace is not None else None, notes=tuple(notes))

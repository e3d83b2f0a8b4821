"""The runtime behind the hackathon interface: one process() call = one image batch, stage by stage.

preprocess (CPU: HWC3, resize, Canny; the edge map goes up as uint8) -> text (cached per prompt pair) ->
hint (once per image; /255 and HWC3 on the device) -> denoise (all steps; one CUDA graph replay where the backend
allows) -> decode (+ uint8 on the device) -> host.
Each stage is an NVTX range. Arguments are checked against the static profile before any work is done.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engines.factory import create_engines, resolve_backend
from graph_capture import DenoiseLoop, GraphedFunction, nvtx_range
from models import load_bundle
from pipeline.preprocess import canny_edges, check_image, edges_to_hint, hwc3, resized_shape
from pipeline.prompts import PromptCache, positive_prompt
from profiles.config import DEFAULT_PROFILE, Backend, Precision, Profile, env_flag, get_profile
from profiles.errors import ControlNetRTError
from scheduler.ddim import control_scales

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything initialize() accepts; `from_env` fills what the no-argument hackathon call leaves out."""

    weights: str = "synthetic"
    profile: str = DEFAULT_PROFILE
    backend: str = Backend.AUTO.value
    device: str = "auto"
    build_root: Path = field(default=REPO_ROOT / "build")
    cuda_graphs: bool = True
    compile_mode: str = "auto"

    @classmethod
    def from_env(cls, **overrides) -> "RuntimeConfig":
        env = {
            "weights": os.environ.get("CNRT_WEIGHTS"),
            "profile": os.environ.get("CNRT_PROFILE"),
            "backend": os.environ.get("CNRT_BACKEND"),
            "device": os.environ.get("CNRT_DEVICE"),
            "build_root": os.environ.get("CNRT_BUILD_DIR"),
            "compile_mode": os.environ.get("CNRT_COMPILE"),
        }
        values = {k: v for k, v in env.items() if v}
        if "build_root" in values:
            values["build_root"] = Path(values["build_root"])
        values["cuda_graphs"] = env_flag("CNRT_CUDA_GRAPHS", True)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ControlNetRTError("device 'cuda' requested but no CUDA GPU is visible: pass device='cpu'")
        return device


class Canny2ImageRuntime:
    def __init__(self, config: RuntimeConfig):
        self.config = config
        self.profile: Profile = get_profile(config.profile)
        self.device = config.resolved_device()
        self.backend = resolve_backend(config.backend, self.device)
        self.bundle = load_bundle(config.weights, cache_root=config.build_root / "weights")
        build_dir = config.build_root / self.profile.name
        self.engines = create_engines(self.backend, self.bundle, self.profile, self.device, build_dir,
                                      compile_mode=config.compile_mode)
        self.prompts = PromptCache(self.engines.text, self.device)
        use_graphs = self.engines.capturable and config.cuda_graphs and self.profile.precision is not Precision.FP32
        pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.loop = DenoiseLoop(self.engines.step, self.profile.ddim_steps, use_graphs, pool=pool)
        self.hint_stage = (GraphedFunction(self.encode_hint, "the hint encoder", pool=pool)
                           if use_graphs else self.encode_hint)
        self.decode_stage = (GraphedFunction(self.engines.decode, "the VAE decoder", pool=pool)
                             if use_graphs else self.engines.decode)
        # The edge map's host copy: page-locked on a GPU so that its upload is an asynchronous copy.
        self._edges_host = torch.empty((self.profile.height, self.profile.width), dtype=torch.uint8,
                                       pin_memory=self.device.type == "cuda")
        self._last_edges: "np.ndarray | None" = None

    @property
    def last_hint_map(self) -> "np.ndarray | None":
        """The last process() call's edge map as the original's `detected_map` (H x W x 3 uint8)."""
        return None if self._last_edges is None else hwc3(self._last_edges)

    def encode_hint(self, edges: torch.Tensor) -> torch.Tensor:
        """(H, W) uint8 edge map on the device -> hint features (B, C0, h, w): float hint + the hint encoder."""
        return self.engines.hint(edges_to_hint(edges, self.profile.num_samples))

    @property
    def description(self) -> str:
        return (f"{self.engines.description}; profile {self.profile.name}; weights {self.bundle.source} "
                f"({self.bundle.weights_id}); CUDA graphs {'on' if self.loop.use_graph else 'off'}")

    def check_request(self, input_image, num_samples, image_resolution, ddim_steps, eta, scale, strength) -> None:
        p = self.profile
        image = check_image(input_image)
        h, w = resized_shape(image.shape[0], image.shape[1], int(image_resolution))
        if (h, w) != (p.height, p.width):
            raise ControlNetRTError(
                f"a {image.shape[0]}x{image.shape[1]} image at image_resolution={image_resolution} becomes {h}x{w}, "
                f"but profile {p.name} serves {p.height}x{p.width}: use a profile of that size (profiles/config.py)")
        if int(num_samples) != p.num_samples:
            raise ControlNetRTError(f"num_samples={num_samples} but profile {p.name} is built for {p.num_samples}: "
                                    "use a profile with that batch (e.g. 256x384-fp16-x2)")
        if int(ddim_steps) != p.ddim_steps:
            raise ControlNetRTError(f"ddim_steps={ddim_steps} but profile {p.name} is built for {p.ddim_steps}")
        if float(eta) != 0.0:
            raise ControlNetRTError(f"eta={eta} is not supported: deterministic DDIM (eta=0) only")
        if not (math.isfinite(float(scale)) and math.isfinite(float(strength))):
            raise ControlNetRTError("scale and strength must be finite numbers")

    @torch.no_grad()
    def process(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                guess_mode, strength, scale, seed, eta, low_threshold, high_threshold) -> list[np.ndarray]:
        self.check_request(input_image, num_samples, image_resolution, ddim_steps, eta, scale, strength)
        b = self.profile.num_samples
        with nvtx_range("preprocess"):
            self._last_edges = canny_edges(input_image, int(image_resolution), low_threshold, high_threshold)
            self._edges_host.numpy()[...] = self._last_edges  # the previous upload ended: process() synchronises
            edges = self._edges_host.to(self.device, non_blocking=True)
        if int(seed) == -1:
            seed = random.randint(0, 65535)
        # pytorch_lightning.seed_everything(seed): python, numpy, torch (CPU and every CUDA device).
        random.seed(int(seed))
        np.random.seed(int(seed))
        torch.manual_seed(int(seed))
        with nvtx_range("text"):
            context = self.prompts.get(positive_prompt(prompt, a_prompt), n_prompt, b)
        with nvtx_range("hint"):
            hint_features = self.hint_stage(edges)
        # The first draw from the device generator after seeding, as in the original sampler.
        x_T = torch.randn(self.profile.latent_shape, device=self.device)
        self.engines.step.prepare(context, hint_features, float(scale), control_scales(float(strength), bool(guess_mode)))
        with nvtx_range("denoise"):
            latent = self.loop(x_T)
        with nvtx_range("decode"):
            images = self.decode_stage(latent)
        with nvtx_range("to-host"):
            images = images.cpu().numpy()
        return [images[i] for i in range(b)]

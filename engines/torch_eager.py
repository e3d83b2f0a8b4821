"""Eager torch engines: the fp32 reference path, and the eager fallback of the torch backend.

`OriginalStepRunner` is ddim_hacked's p_sample_ddim: two separate apply_model calls per step (cond, then uncond,
each batch B), the uncond one without ControlNet in guess mode. It is the ground truth every other backend is
scored against. `BatchedStepRunner` runs `models.step.FusedDenoiseStep` (one batch-2B call), the same function
every exported / compiled engine implements.
"""

from __future__ import annotations

import torch

from engines.base import EngineSet
from models.bundle import ModelBundle
from models.step import ControlledUNet, ControlNetResiduals, FusedDenoiseStep, HintEncoder, LatentDecoder, TextEncoder
from profiles.config import Precision, Profile
from scheduler.ddim import cfg_mix, ddim_update, make_ddim_tables


class _PreparedInputs:
    """Static device buffers for the per-image inputs, updated in place by prepare()."""

    def __init__(self, device):
        self.device = device
        self.context = self.hint_features = self.guidance_scale = self.control_scales = None

    def prepare(self, context, hint_features, guidance_scale, control_scales) -> None:
        values = {
            "context": context.float(),
            "hint_features": hint_features.float(),
            "guidance_scale": torch.tensor([float(guidance_scale)], dtype=torch.float32),
            "control_scales": control_scales.float(),
        }
        for name, value in values.items():
            buf = getattr(self, name)
            if buf is None or buf.shape != value.shape:
                setattr(self, name, value.to(self.device).clone())
            else:
                buf.copy_(value, non_blocking=True)


class OriginalStepRunner(_PreparedInputs):
    def __init__(self, bundle: ModelBundle, profile: Profile, device):
        super().__init__(device)
        self.controlnet = ControlNetResiduals(bundle.controlnet)
        self.unet = ControlledUNet(bundle.unet)
        self.tables = make_ddim_tables(profile.ddim_steps).to(device)
        self.num_samples = profile.num_samples
        self._uncond_has_control = True

    def prepare(self, context, hint_features, guidance_scale, control_scales) -> None:
        super().prepare(context, hint_features, guidance_scale, control_scales)
        self._uncond_has_control = bool(control_scales[1].abs().sum() > 0)  # guess mode drops it

    def _apply_model(self, x, t, context, scales):
        dtype = next(self.unet.parameters()).dtype
        x = x.to(dtype)
        context = context.to(dtype)
        if scales is None:
            return self.unet.net(x, t, encoder_hidden_states=context, return_dict=False)[0].float()
        residuals = self.controlnet(x, t, context, self.hint_features.to(dtype))
        controls = [r * scales[i].to(dtype) for i, r in enumerate(residuals)]
        return self.unet(x, t, context, controls).float()

    @torch.no_grad()
    def step(self, x: torch.Tensor, k: int) -> torch.Tensor:
        b = self.num_samples
        t = self.tables.timesteps[k].expand(b)
        cond, uncond = self.context[:b], self.context[b:]
        e_cond = self._apply_model(x, t, cond, self.control_scales[0])
        e_uncond = self._apply_model(x, t, uncond, self.control_scales[1] if self._uncond_has_control else None)
        e_t = cfg_mix(e_cond, e_uncond, self.guidance_scale.reshape(1, 1, 1, 1))
        return ddim_update(x, e_t, self.tables.coeffs[k])


class BatchedStepRunner(_PreparedInputs):
    def __init__(self, step: FusedDenoiseStep, profile: Profile, device):
        super().__init__(device)
        self.module = step
        tables = make_ddim_tables(profile.ddim_steps).to(device)
        self.timesteps = tables.timesteps.float()
        self.coeffs = tables.coeffs

    @torch.no_grad()
    def step(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.module(x, self.timesteps[k : k + 1], self.coeffs[k], self.context, self.hint_features,
                           self.guidance_scale, self.control_scales)


def build_eager_engines(bundle: ModelBundle, profile: Profile, device: torch.device, original: bool) -> EngineSet:
    """Eager engines in the profile's precision; `original=True` gives the two-call reference step."""
    dtype = profile.precision.torch_dtype
    bundle.to(device=device, dtype=dtype)
    if profile.precision is Precision.FP32 and device.type == "cuda":
        # The reference is strict fp32: TF32 would move it by ~60 dB PSNR's worth.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    text, hint, decode = TextEncoder(bundle.text_encoder), HintEncoder(bundle.controlnet), LatentDecoder(bundle.vae)
    if original:
        step = OriginalStepRunner(bundle, profile, device)
        kind = "original two-call DDIM"
    else:
        step = BatchedStepRunner(FusedDenoiseStep(bundle.unet, bundle.controlnet), profile, device)
        kind = "batched fused step"
    return EngineSet(
        text=torch.no_grad()(text.forward),
        hint=torch.no_grad()(hint.forward),
        step=step,
        decode=torch.no_grad()(decode.forward),
        device=device,
        description=f"torch eager {profile.precision.value} ({kind}) on {device}",
        capturable=device.type == "cuda",
    )

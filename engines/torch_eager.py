"""Eager torch engines: the fp32 reference path (and the EngineSet assembly every torch backend shares).

`OriginalStepRunner` is ddim_hacked's p_sample_ddim: two separate apply_model calls per step (cond, then uncond,
each batch B), the uncond one without ControlNet in guess mode. It is the ground truth every other backend is
scored against.
"""

from __future__ import annotations

import torch

from engines.base import EngineSet
from models.bundle import ModelBundle
from models.step import ControlledUNet, ControlNetResiduals, HintEncoder, LatentDecoder, TextEncoder
from profiles.config import Precision, Profile
from scheduler.ddim import cfg_mix, ddim_update, make_ddim_tables


class OriginalStepRunner:
    def __init__(self, bundle: ModelBundle, profile: Profile, device):
        self.device = device
        self.context = self.hint_features = self.guidance_scale = self.control_scales = None
        self.controlnet = ControlNetResiduals(bundle.controlnet)
        self.unet = ControlledUNet(bundle.unet)
        self.tables = make_ddim_tables(profile.ddim_steps).to(device)
        self.num_samples = profile.num_samples
        self._uncond_has_control = True

    def prepare(self, context, hint_features, guidance_scale, control_scales) -> None:
        """Copies the per-image inputs into static device buffers (in place once allocated)."""
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


def torch_engine_set(bundle: ModelBundle, step, decode, device: torch.device, description: str) -> EngineSet:
    """The EngineSet of a torch backend: CLIP and the hint block eager, `step` and `decode` as given."""
    text, hint = TextEncoder(bundle.text_encoder), HintEncoder(bundle.controlnet)
    return EngineSet(
        text=torch.no_grad()(text.forward),
        hint=torch.no_grad()(hint.forward),
        step=step,
        decode=torch.no_grad()(decode),
        device=device,
        description=description,
        capturable=device.type == "cuda",
    )


def build_eager_engines(bundle: ModelBundle, profile: Profile, device: torch.device) -> EngineSet:
    """The reference: eager, in the profile's precision, with the two-call step of the original."""
    bundle.to(device=device, dtype=profile.precision.torch_dtype)
    if profile.precision is Precision.FP32 and device.type == "cuda":
        # The reference is strict fp32: TF32 would move it by ~60 dB PSNR's worth.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch_engine_set(bundle, OriginalStepRunner(bundle, profile, device), LatentDecoder(bundle.vae), device,
                            f"torch eager {profile.precision.value} (original two-call DDIM) on {device}")

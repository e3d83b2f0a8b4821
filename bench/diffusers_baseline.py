"""The baselines a user would write with diffusers: UNet2DConditionModel + ControlNetModel called through their
public forward (CFG as one batch of 2), the DDIM update in torch, optionally channels_last, torch.compile and one
CUDA graph over the 20 steps. Same schedule tables and initial noise as ours, so outputs are comparable."""

from __future__ import annotations

import torch

from scheduler.ddim import cfg_mix, ddim_update, make_ddim_tables


class DiffusersLoop(torch.nn.Module):
    """x_T (B,4,h,w) fp32, hint (B,3,H,W), context (2B,77,D) -> final latent (B,4,h,w) fp32."""

    def __init__(self, unet, controlnet, steps: int, guidance_scale: float, device):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        tables = make_ddim_tables(steps).to(device)
        self.timesteps, self.coeffs = tables.timesteps, tables.coeffs
        self.steps = steps
        self.guidance_scale = guidance_scale

    def step(self, x, hint2, context, k: int):
        dtype = self.unet.dtype
        xx = torch.cat([x, x]).to(dtype)
        t = self.timesteps[k]
        down, mid = self.controlnet(xx, t, encoder_hidden_states=context, controlnet_cond=hint2,
                                    conditioning_scale=1.0, return_dict=False)
        eps = self.unet(xx, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0].float()
        e_cond, e_uncond = eps.chunk(2)
        return ddim_update(x, cfg_mix(e_cond, e_uncond, self.guidance_scale), self.coeffs[k])

    @torch.no_grad()
    def forward(self, x_T, hint, context):
        dtype = self.unet.dtype
        hint2 = torch.cat([hint, hint]).to(dtype)
        context = context.to(dtype)
        x = x_T
        for k in range(self.steps):
            x = self.step(x, hint2, context, k)
        return x

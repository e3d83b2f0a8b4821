"""The fused denoising step and the per-image / per-prompt networks around it, as torch modules.

One descriptor (`step_io`) names the step's inputs and outputs with their shapes, and every backend (the torch
engine, the ONNX export in surgery/, onnxruntime, TensorRT) uses those names. The step computes, for latent x and
one DDIM step:
    ControlNet([x, x], t, [cond, uncond], hint_features) -> 13 residuals, times control_scales
    UNet([x, x], t, [cond, uncond], residuals)           -> eps_cond, eps_uncond
    e = eps_u + guidance_scale * (eps_c - eps_u);  x_prev = DDIM(x, e, coeffs)
The batch is [cond] * B + [uncond] * B; control_scales is (2, 13): row 0 for cond, row 1 for uncond.
Per-step constants are inputs, so one engine serves every step.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from profiles.config import LATENT_CHANNELS, NUM_CONTROLS, Profile
from scheduler.ddim import cfg_mix, ddim_update

STEP_INPUTS = ("x", "timestep", "coeffs", "context", "hint_features", "guidance_scale", "control_scales")
STEP_OUTPUTS = ("x_prev",)
TEXT_TOKENS = 77


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def step_io(profile: Profile, context_dim: int, hint_channels: int) -> "OrderedDict[str, TensorSpec]":
    """Names, shapes and dtypes of the fused step's inputs then outputs (all float32 at the boundary)."""
    b, _, h, w = profile.latent_shape
    f32 = torch.float32
    return OrderedDict(
        x=TensorSpec((b, LATENT_CHANNELS, h, w), f32),
        timestep=TensorSpec((1,), f32),
        coeffs=TensorSpec((4,), f32),
        context=TensorSpec((2 * b, TEXT_TOKENS, context_dim), f32),
        hint_features=TensorSpec((b, hint_channels, h, w), f32),
        guidance_scale=TensorSpec((1,), f32),
        control_scales=TensorSpec((2, NUM_CONTROLS), f32),
        x_prev=TensorSpec((b, LATENT_CHANNELS, h, w), f32),
    )


def _network_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class HintEncoder(nn.Module):
    """ControlNet's input hint block: (B, 3, H, W) in [0, 1] -> (B, C0, H/8, W/8). Depends on the image only."""

    def __init__(self, controlnet):
        super().__init__()
        self.embedding = controlnet.controlnet_cond_embedding

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        return self.embedding(hint.to(_network_dtype(self))).float()


class ControlNetResiduals(nn.Module):
    """ControlNetModel.forward with the hint block already applied (its output is an input here)."""

    def __init__(self, controlnet):
        super().__init__()
        self.net = controlnet

    def forward(self, sample, timesteps, context, hint_features) -> tuple[torch.Tensor, ...]:
        net = self.net
        emb = net.time_embedding(net.time_proj(timesteps).to(sample.dtype))
        sample = net.conv_in(sample) + hint_features
        residuals = [sample]
        for block in net.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            residuals.extend(res)
        sample = net.mid_block(sample, emb, encoder_hidden_states=context)
        outs = [zero_conv(r) for r, zero_conv in zip(residuals, net.controlnet_down_blocks)]
        outs.append(net.controlnet_mid_block(sample))
        return tuple(outs)


class ControlledUNet(nn.Module):
    """UNet2DConditionModel with the 13 control residuals added (12 to the skips, 1 after the mid block)."""

    def __init__(self, unet):
        super().__init__()
        self.net = unet

    def forward(self, sample, timesteps, context, controls) -> torch.Tensor:
        return self.net(sample, timesteps, encoder_hidden_states=context,
                        down_block_additional_residuals=list(controls[:-1]),
                        mid_block_additional_residual=controls[-1], return_dict=False)[0]


class GuidedDDIMUpdate(nn.Module):
    """CFG mix then the eta=0 DDIM update, in float32 whatever the networks ran in."""

    def forward(self, x, eps, guidance_scale, coeffs) -> torch.Tensor:
        e_cond, e_uncond = eps.float().chunk(2)
        return ddim_update(x, cfg_mix(e_cond, e_uncond, guidance_scale.reshape(1, 1, 1, 1)), coeffs)


class FusedDenoiseStep(nn.Module):
    """One whole denoising step (see module docstring); inputs and output as `step_io`."""

    def __init__(self, unet, controlnet):
        super().__init__()
        self.controlnet = ControlNetResiduals(controlnet)
        self.unet = ControlledUNet(unet)
        self.update = GuidedDDIMUpdate()

    def forward(self, x, timestep, coeffs, context, hint_features, guidance_scale, control_scales):
        dtype = _network_dtype(self.unet)
        batch = torch.cat([x, x]).to(dtype)
        t = timestep.expand(batch.shape[0])
        context = context.to(dtype)
        hint = torch.cat([hint_features, hint_features]).to(dtype)
        residuals = self.controlnet(batch, t, context, hint)
        # Row 0 scales the cond half, row 1 the uncond half (all zero in guess mode = no control there).
        scales = control_scales.to(dtype).repeat_interleave(x.shape[0], dim=0)
        controls = [r * scales[:, i].reshape(-1, 1, 1, 1) for i, r in enumerate(residuals)]
        eps = self.unet(batch, t, context, controls)
        return self.update(x, eps, guidance_scale, coeffs)


class TextEncoder(nn.Module):
    """FrozenCLIPEmbedder: token ids (N, 77) -> last_hidden_state (N, 77, D), float32."""

    def __init__(self, text_encoder):
        super().__init__()
        self.net = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids).last_hidden_state.float()


class LatentDecoder(nn.Module):
    """decode_first_stage + the uint8 conversion of process(): latent (B, 4, h, w) -> (B, H, W, 3) uint8.

    Truncates like `.clip(0, 255).astype(np.uint8)` in the original (float -> uint8 casts truncate in torch too).
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = (latent / self.scale).to(_network_dtype(self.vae))
        image = self.vae.decode(z, return_dict=False)[0].float()
        image = image.permute(0, 2, 3, 1) * 127.5 + 127.5
        return image.clamp(0, 255).to(torch.uint8)


def network_io(profile: Profile, context_dim: int, hint_channels: int) -> "dict[str, OrderedDict[str, TensorSpec]]":
    """Inputs then outputs of each exported network, by network name. The fused step's are `step_io`.

    text_encoder: input_ids (2B, 77) int64 -> context (2B, 77, D) float32   ([cond] * B + [uncond] * B)
    hint_encoder: hint (B, 3, H, W) float32 in [0, 1] -> hint_features (B, C0, H/8, W/8) float32
    vae_decoder:  latent (B, 4, H/8, W/8) float32 -> image (B, H, W, 3) uint8
    """
    b, c, h, w = profile.latent_shape
    f32 = torch.float32
    return {
        "fused_step": step_io(profile, context_dim, hint_channels),
        "text_encoder": OrderedDict(input_ids=TensorSpec((2 * b, TEXT_TOKENS), torch.int64),
                                    context=TensorSpec((2 * b, TEXT_TOKENS, context_dim), f32)),
        "hint_encoder": OrderedDict(hint=TensorSpec((b, 3, profile.height, profile.width), f32),
                                    hint_features=TensorSpec((b, hint_channels, h, w), f32)),
        "vae_decoder": OrderedDict(latent=TensorSpec((b, c, h, w), f32),
                                   image=TensorSpec((b, profile.height, profile.width, 3), torch.uint8)),
    }


NETWORK_OUTPUTS = {"fused_step": STEP_OUTPUTS, "text_encoder": ("context",), "hint_encoder": ("hint_features",),
                   "vae_decoder": ("image",)}

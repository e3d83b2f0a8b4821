"""The loaded networks of one pipeline, as one value passed between packages."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelBundle:
    """UNet, ControlNet, VAE and CLIP text encoder (diffusers / transformers modules, eval mode, fp32 on CPU as
    loaded). `weights_id` is a content hash that artifact manifests are keyed on; `source` says where they came from."""

    unet: torch.nn.Module
    controlnet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    weights_id: str
    source: str

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def vae_scale_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "controlnet": self.controlnet, "vae": self.vae, "text_encoder": self.text_encoder}

    def to(self, device=None, dtype=None) -> "ModelBundle":
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

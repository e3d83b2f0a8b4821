"""Seeded synthetic weights of the real architecture (untrained!).

No model hub is reachable here, so the default run uses random weights. Two changes make them a fair test of a
fast path: ControlNet's zero-convs get small non-zero weights (else the control path is invisible), and the hint
block gets He-normal init (else default init washes the edge map out and the hint barely changes the image).
The folder written is an ordinary diffusers-format weights folder, cached so repeated runs don't regenerate it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

from artifacts import atomic_directory
from models.configs import get_architecture

SYNTHETIC_RECIPE_VERSION = 2
SUBFOLDERS = ("unet", "controlnet", "vae", "text_encoder")


def synthetic_weights_id(arch: str, seed: int) -> str:
    text = f"synthetic arch={arch} seed={seed} recipe={SYNTHETIC_RECIPE_VERSION}"
    return "synthetic-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def build_networks(arch_name: str, seed: int) -> dict[str, torch.nn.Module]:
    """Instantiate the four networks with seeded init, then make the control path visible."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = get_architecture(arch_name)
    torch.manual_seed(seed)
    nets = {
        "unet": UNet2DConditionModel(**arch.unet),
        "controlnet": ControlNetModel(**arch.controlnet),
        "vae": AutoencoderKL(**arch.vae),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.text_encoder)),
    }
    _make_control_visible(nets["controlnet"], torch.Generator().manual_seed(seed + 1), arch.control_gain,
                          arch.hint_gain)
    for net in nets.values():
        net.eval().requires_grad_(False)
    return nets


@torch.no_grad()
def _make_control_visible(controlnet, generator: torch.Generator, control_gain: float, hint_gain: float) -> None:
    hint = controlnet.controlnet_cond_embedding
    for conv in [hint.conv_in, *hint.blocks]:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
        conv.bias.zero_()
    zero_convs = [hint.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for conv in zero_convs:
        std = (hint_gain if conv is hint.conv_out else control_gain) / math.sqrt(conv.in_channels)
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
        conv.bias.zero_()


def ensure_synthetic_folder(arch_name: str, seed: int, cache_root: "str | Path") -> Path:
    """Return a diffusers-format folder holding the synthetic weights, generating it once."""
    folder = Path(cache_root) / f"synthetic-{arch_name}-seed{seed}"
    stamp = folder / "synthetic.json"
    wanted = {"arch": arch_name, "seed": seed, "recipe": SYNTHETIC_RECIPE_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    print(f"[weights] generating synthetic {arch_name} weights (seed {seed}) into {folder} ...", file=sys.stderr,
          flush=True)
    nets = build_networks(arch_name, seed)
    with atomic_directory(folder) as tmp:
        for name, net in nets.items():
            net.save_pretrained(tmp / name, safe_serialization=True)
        (tmp / "synthetic.json").write_text(json.dumps(wanted))
    return folder

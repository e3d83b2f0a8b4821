"""Architectures of the four networks, as diffusers / transformers configs.

`sd15` is the SD1.5 + ControlNet-canny architecture of ControlNet's `models/cldm_v15.yaml` (UNet and ControlNet with
320/640/1280/1280 channels, 8 heads, 768-d text context; the f=8 KL autoencoder; the CLIP ViT-L/14 text encoder).
`tiny` keeps every structural feature (4 levels, 2 layers per block, hence 13 control residuals; attention at the
first three levels; GEGLU; the 8-conv hint block) with small widths, so CPU tests run the same code paths.
The loader reads the architecture from the weights, so these configs only matter for synthetic weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from profiles.errors import ControlNetRTError

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class Architecture:
    name: str
    unet: dict
    controlnet: dict
    vae: dict
    text_encoder: dict = field(default_factory=dict)
    # Synthetic-weights recipe: std of ControlNet's zero-convs is gain / sqrt(in_channels) (models/synthetic.py).
    # design.md measured 0.3 on sd15; the tiny nets need more for the hint to move the image (36 dB, not 57 dB).
    control_gain: float = 0.3
    hint_gain: float = 0.3


def _unet_common(channels, groups, heads, context_dim) -> dict:
    return dict(
        in_channels=4,
        block_out_channels=list(channels),
        layers_per_block=2,
        down_block_types=list(DOWN_BLOCKS),
        norm_num_groups=groups,
        norm_eps=1e-5,
        cross_attention_dim=context_dim,
        attention_head_dim=heads,  # diffusers' legacy name: for SD1.5 this is the number of heads (8)
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        act_fn="silu",
    )


def _architecture(name, channels, groups, heads, context_dim, hint_channels, vae_channels, vae_groups, vae_layers,
                  clip, control_gain=0.3, hint_gain=0.3) -> Architecture:
    common = _unet_common(channels, groups, heads, context_dim)
    unet = dict(common, out_channels=4, up_block_types=list(UP_BLOCKS), sample_size=64, center_input_sample=False,
                mid_block_scale_factor=1)
    controlnet = dict(common, conditioning_embedding_out_channels=list(hint_channels),
                      controlnet_conditioning_channel_order="rgb", conditioning_channels=3)
    vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=list(vae_channels),
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        layers_per_block=vae_layers,
        norm_num_groups=vae_groups,
        act_fn="silu",
        sample_size=256,
        scaling_factor=0.18215,
    )
    return Architecture(name, unet, controlnet, vae, clip, control_gain, hint_gain)


ARCHITECTURES: dict[str, Architecture] = {
    "sd15": _architecture(
        "sd15", (320, 640, 1280, 1280), 32, 8, 768, (16, 32, 96, 256), (128, 256, 512, 512), 32, 2,
        dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    ),
    "tiny": _architecture(
        "tiny", (32, 32, 64, 64), 8, 2, 32, (8, 8, 16, 16), (16, 16, 32, 32), 8, 1,
        dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32),
        control_gain=1.0, hint_gain=3.0,
    ),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ControlNetRTError(f"unknown architecture {name!r}: choose one of {', '.join(ARCHITECTURES)}") from None

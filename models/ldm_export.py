"""Diffusers / transformers networks -> an original ControlNet checkpoint (LDM key names), and the key map itself.

Two users: people who want a `control_sd15_canny.pth`-layout file (the original ControlNet code loads it with its
strict `load_state_dict`, so the schedule buffers and CLIP's `position_ids` are written too, with the yaml beside
it), and `models.ldm_checkpoint`, which maps a freshly built network's keys through `ldm_key_map` to know which LDM
keys a checkpoint must hold. The map follows diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py
and its ControlNet counterpart, but is derived from each network's config instead of hard-coding SD1.5's 4 levels
x 2 layers, so tiny test models export through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from artifacts import atomic_file
from profiles.errors import ControlNetRTError
from scheduler.ddim import LINEAR_END, LINEAR_START
from scheduler.ddim import NUM_TRAIN_TIMESTEPS as NUM_TIMESTEPS

# Where each network lives in the original ControlLDM state dict.
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "controlnet": "control_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
# transformers < 4.31 stored CLIP's position ids as a persistent buffer and control_sd15_canny.pth carries it
# (lllyasviel/ControlNet#721); the current CLIPTextModel keeps it non-persistent and has no `text_model.` level.
CLIP_TEXT_MODEL_PREFIX = "text_model."
CLIP_POSITION_IDS = "embeddings.position_ids"
# DDPM.register_schedule buffers (plus `logvar`) of ldm/models/diffusion/ddpm.py: no network uses them here.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
)
LDM_SCALE_FACTOR = 0.18215
LDM_NORM_GROUPS = 32  # LDM's normalization() is always GroupNorm32
CHECKPOINT_WRITERS = {".pth": "torch", ".ckpt": "torch", ".pt": "torch", ".safetensors": "safetensors"}
# The top-level yaml section for what LDM hard-codes but our tiny models change; the original code reads only
# `model:`, so the section is invisible to it.
YAML_EXTENSION = "controlnet_rt"

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass(frozen=True)
class _Rule:
    """Keys under `diffusers` map to keys under `ldm`; the module path after the prefix is renamed by `modules`.
    `conv1x1`: LDM stores these linear weights as 1x1 convs (the VAE's mid attention)."""

    diffusers: str
    ldm: str
    modules: "dict[str, str] | None" = None
    conv1x1: bool = False


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def _unet_encoder_rules(config) -> list[_Rule]:
    """time embedding, conv_in, down blocks and mid block: shared by the UNet and the ControlNet."""
    layers = config.layers_per_block
    levels = len(config.block_out_channels)
    rules = [_Rule("time_embedding.linear_1.", "time_embed.0."), _Rule("time_embedding.linear_2.", "time_embed.2."),
             _Rule("conv_in.", "input_blocks.0.0.")]
    index = 1
    for level in range(levels):
        for j in range(layers):
            rules.append(_Rule(f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{index}.0.", _UNET_RESNET))
            rules.append(_Rule(f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{index}.1."))
            index += 1
        if level < levels - 1:
            rules.append(_Rule(f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op."))
            index += 1
    rules += [_Rule("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
              _Rule("mid_block.attentions.0.", "middle_block.1."),
              _Rule("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    return rules


def _unet_rules(config) -> list[_Rule]:
    rules = _unet_encoder_rules(config)
    levels = len(config.block_out_channels)
    index = 0
    for level, block_type in enumerate(config.up_block_types):
        for j in range(config.layers_per_block + 1):
            rules.append(_Rule(f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{index}.0.", _UNET_RESNET))
            rules.append(_Rule(f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{index}.1."))
            if j == config.layers_per_block and level < levels - 1:
                # LDM's output block is [ResBlock, (SpatialTransformer), Upsample]
                slot = 2 if _has_attention(block_type) else 1
                rules.append(_Rule(f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{index}.{slot}."))
            index += 1
    rules += [_Rule("conv_norm_out.", "out.0."), _Rule("conv_out.", "out.2.")]
    return rules


def _controlnet_rules(config) -> list[_Rule]:
    rules = _unet_encoder_rules(config)
    # input_hint_block is Sequential(conv, SiLU, conv, SiLU, ..., zero_conv): convs at even indices
    num_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    rules.append(_Rule("controlnet_cond_embedding.conv_in.", "input_hint_block.0."))
    rules += [_Rule(f"controlnet_cond_embedding.blocks.{b}.", f"input_hint_block.{2 * (b + 1)}.")
              for b in range(num_blocks)]
    rules.append(_Rule("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (num_blocks + 1)}."))
    num_zero_convs = 1 + len(config.block_out_channels) * (config.layers_per_block + 1) - 1
    rules += [_Rule(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.") for i in range(num_zero_convs)]
    rules.append(_Rule("controlnet_mid_block.", "middle_block_out.0."))
    return rules


def _vae_rules(config) -> list[_Rule]:
    levels = len(config.block_out_channels)
    rules = []
    for coder in ("encoder", "decoder"):
        rules += [_Rule(f"{coder}.conv_in.", f"{coder}.conv_in."), _Rule(f"{coder}.conv_out.", f"{coder}.conv_out."),
                  _Rule(f"{coder}.conv_norm_out.", f"{coder}.norm_out."),
                  _Rule(f"{coder}.mid_block.attentions.0.", f"{coder}.mid.attn_1.", _VAE_ATTENTION, conv1x1=True)]
        rules += [_Rule(f"{coder}.mid_block.resnets.{j}.", f"{coder}.mid.block_{j + 1}.", _VAE_RESNET)
                  for j in range(2)]
    for level in range(levels):
        rules += [_Rule(f"encoder.down_blocks.{level}.resnets.{j}.", f"encoder.down.{level}.block.{j}.", _VAE_RESNET)
                  for j in range(config.layers_per_block)]
        rules.append(_Rule(f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample."))
        # LDM numbers the decoder's up levels from the lowest resolution's end: diffusers' up_blocks.0 is up.{L-1}
        up = levels - 1 - level
        rules += [_Rule(f"decoder.up_blocks.{level}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _VAE_RESNET)
                  for j in range(config.layers_per_block + 1)]
        rules.append(_Rule(f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    rules += [_Rule("quant_conv.", "quant_conv."), _Rule("post_quant_conv.", "post_quant_conv.")]
    return rules


def _rules(component: str, module) -> list[_Rule]:
    if component == "text_encoder":
        return [_Rule("", CLIP_TEXT_MODEL_PREFIX)]
    builders = {"unet": _unet_rules, "controlnet": _controlnet_rules, "vae": _vae_rules}
    return builders[component](module.config)


def _apply(rule: _Rule, key: str) -> str:
    rest = key[len(rule.diffusers):]
    if rule.modules:
        module, _, param = rest.rpartition(".")
        rest = f"{rule.modules.get(module, module)}.{param}" if module else param
    return rule.ldm + rest


def ldm_key_map(component: str, module) -> dict[str, str]:
    """Diffusers state-dict key -> LDM key (with the component's checkpoint prefix) for every persistent tensor."""
    rules = sorted(_rules(component, module), key=lambda r: len(r.diffusers), reverse=True)
    prefix = LDM_PREFIXES[component]
    mapping = {}
    for key in module.state_dict():
        rule = next((r for r in rules if key.startswith(r.diffusers)), None)
        if rule is None:
            raise ControlNetRTError(f"cannot map {component} parameter {key!r} to an LDM key: this architecture "
                                    "is not an SD1.x-style UNet/ControlNet/VAE; export it as a diffusers folder")
        mapping[key] = prefix + _apply(rule, key)
    return mapping


def _conv1x1_keys(component: str, module) -> set[str]:
    """Diffusers keys of 2-D weights that LDM stores as (out, in, 1, 1) convs."""
    if component != "vae":
        return set()
    rules = [r for r in _rules(component, module) if r.conv1x1]
    return {k for k, v in module.state_dict().items() if v.ndim == 2 and any(k.startswith(r.diffusers) for r in rules)}


def schedule_buffers() -> dict[str, torch.Tensor]:
    """DDPM.register_schedule for cldm_v15.yaml (linear betas), computed in float64 then stored float32, as there."""
    betas = torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        "logvar": torch.zeros(NUM_TIMESTEPS, dtype=torch.float64),
    }
    return {name: values[name].to(torch.float32) for name in SCHEDULE_BUFFERS}


def _networks(bundle_or_nets) -> dict:
    nets = bundle_or_nets.modules() if hasattr(bundle_or_nets, "modules") and not isinstance(
        bundle_or_nets, dict) else dict(bundle_or_nets)
    missing = [name for name in LDM_PREFIXES if name not in nets]
    if missing:
        raise ControlNetRTError(f"cannot export an LDM checkpoint without {', '.join(missing)}: pass a ModelBundle "
                                f"or a dict with {', '.join(LDM_PREFIXES)}")
    return nets


def ldm_state_dict(bundle_or_nets, include_schedule: bool = True) -> dict[str, torch.Tensor]:
    """The four networks' tensors under original ControlLDM key names (tensors shared, not copied)."""
    nets = _networks(bundle_or_nets)
    out: dict[str, torch.Tensor] = {}
    for component in LDM_PREFIXES:
        module = nets[component]
        state = module.state_dict()
        conv_keys = _conv1x1_keys(component, module)
        for key, ldm_key in ldm_key_map(component, module).items():
            tensor = state[key].detach()
            out[ldm_key] = (tensor[:, :, None, None] if key in conv_keys else tensor).contiguous()
    text = nets["text_encoder"]
    out[LDM_PREFIXES["text_encoder"] + CLIP_TEXT_MODEL_PREFIX + CLIP_POSITION_IDS] = torch.arange(
        text.config.max_position_embeddings, dtype=torch.int64)[None]
    if include_schedule:
        out.update(schedule_buffers())
    return out


def _attention_resolutions(block_types) -> list[int]:
    # LDM's `ds` doubles per level and attention sits where ds is listed; cldm_v15 writes them high-to-low
    return sorted((2 ** level for level, t in enumerate(block_types) if _has_attention(t)), reverse=True)


def _heads(config) -> dict:
    heads = config.attention_head_dim  # diffusers' legacy name: the number of heads
    if isinstance(heads, int):
        return {"num_heads": heads}
    widths = list(config.block_out_channels)
    channels = {w // h for w, h in zip(widths, heads)}
    if len(channels) != 1:
        raise ControlNetRTError(f"per-level heads {list(heads)} have no single head width: LDM cannot express it")
    return {"num_heads": -1, "num_head_channels": channels.pop()}


def _unet_params(config, context_dim: int) -> dict:
    widths = list(config.block_out_channels)
    depth = config.transformer_layers_per_block
    return dict(
        image_size=32, in_channels=config.in_channels, model_channels=widths[0],
        attention_resolutions=_attention_resolutions(config.down_block_types),
        num_res_blocks=config.layers_per_block, channel_mult=[w // widths[0] for w in widths],
        **_heads(config), use_spatial_transformer=True, transformer_depth=depth if isinstance(depth, int) else
        list(depth), context_dim=context_dim, use_checkpoint=True, legacy=False,
        **({"use_linear_in_transformer": True} if config.use_linear_projection else {}),
    )


def ldm_yaml_config(bundle_or_nets) -> dict:
    """A cldm_v15.yaml-layout config describing these networks (plus the `controlnet_rt` section for what LDM
    hard-codes: norm groups and the CLIP text model's heads / activation)."""
    nets = _networks(bundle_or_nets)
    unet, control, vae, text = (nets[k].config for k in ("unet", "controlnet", "vae", "text_encoder"))
    vae_widths = list(vae.block_out_channels)
    unet_params = dict(_unet_params(unet, unet.cross_attention_dim), out_channels=unet.out_channels)
    control_params = dict(_unet_params(control, control.cross_attention_dim),
                          hint_channels=control.conditioning_channels)
    return {
        "model": {
            "target": "cldm.cldm.ControlLDM",
            "params": {
                "linear_start": LINEAR_START, "linear_end": LINEAR_END, "num_timesteps_cond": 1,
                "log_every_t": 200, "timesteps": NUM_TIMESTEPS, "first_stage_key": "jpg", "cond_stage_key": "txt",
                "control_key": "hint", "image_size": 64, "channels": 4, "cond_stage_trainable": False,
                "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
                "scale_factor": float(vae.scaling_factor), "use_ema": False, "only_mid_control": False,
                "control_stage_config": {"target": "cldm.cldm.ControlNet", "params": control_params},
                "unet_config": {"target": "cldm.cldm.ControlledUnetModel", "params": unet_params},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": vae.latent_channels, "monitor": "val/rec_loss",
                        "ddconfig": {
                            "double_z": True, "z_channels": vae.latent_channels, "resolution": vae.sample_size,
                            "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": vae_widths[0],
                            "ch_mult": [w // vae_widths[0] for w in vae_widths],
                            "num_res_blocks": vae.layers_per_block, "attn_resolutions": [], "dropout": 0.0,
                        },
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
            },
        },
        YAML_EXTENSION: {
            "norm_num_groups": unet.norm_num_groups, "vae_norm_num_groups": vae.norm_num_groups,
            "text_num_heads": text.num_attention_heads, "text_hidden_act": text.hidden_act,
        },
    }


def _check_exportable(nets) -> None:
    if nets["controlnet"].config.norm_num_groups != nets["unet"].config.norm_num_groups:
        raise ControlNetRTError("UNet and ControlNet use different GroupNorm groups: the LDM yaml has one value")
    hint = nets["controlnet"].config.conditioning_embedding_out_channels
    if len(hint) != 4:
        # diffusers' convert_controlnet_checkpoint hard-codes the zero conv at input_hint_block.14
        raise ControlNetRTError(f"a hint block with {len(hint)} levels cannot round-trip through LDM keys: "
                                "use 4 levels as in cldm_v15.yaml")


def save_ldm_checkpoint(bundle_or_nets, path: "str | Path", *, write_config: bool = True,
                        include_schedule: bool = True) -> Path:
    """Write the networks as an original ControlNet checkpoint (.pth/.ckpt/.pt via torch.save, or .safetensors),
    atomically; with `write_config`, also `<stem>.yaml` beside it (what the weights can't say, e.g. heads)."""
    path = Path(path)
    writer = CHECKPOINT_WRITERS.get(path.suffix)
    if writer is None:
        raise ControlNetRTError(f"cannot write {path}: use one of {', '.join(CHECKPOINT_WRITERS)}")
    nets = _networks(bundle_or_nets)
    _check_exportable(nets)
    state = ldm_state_dict(nets, include_schedule=include_schedule)
    with atomic_file(path) as tmp:
        if writer == "safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
    if write_config:
        import yaml

        with atomic_file(path.with_suffix(".yaml")) as tmp:
            tmp.write_text(yaml.safe_dump(ldm_yaml_config(nets), sort_keys=False))
    return path

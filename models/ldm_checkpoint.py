"""An original ControlNet checkpoint (`control_sd15_canny.pth`, LDM key names) -> the four diffusers networks.

The hackathon's weights ship in this layout. Keys are converted by diffusers' own single-file converters
(`convert_ldm_unet_checkpoint`, `convert_controlnet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`); the architecture is read from weight shapes, so tiny test checkpoints load through
the same code. What the weights cannot say (attention heads, GroupNorm groups) comes from a cldm_v15.yaml-layout
file, `<checkpoint stem>.yaml` beside it or passed explicitly, else from SD1.5's values. Before converting, the
checkpoint's keys are checked against the keys the inferred networks need (via `ldm_export.ldm_key_map`), because
the diffusers converters silently turn a missing key into None.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from models.ldm_export import (
    CHECKPOINT_WRITERS,
    CLIP_POSITION_IDS,
    CLIP_TEXT_MODEL_PREFIX,
    LDM_NORM_GROUPS,
    LDM_PREFIXES,
    LDM_SCALE_FACTOR,
    SCHEDULE_BUFFERS,
    YAML_EXTENSION,
    ldm_key_map,
)
from profiles.errors import ControlNetRTError

COMPONENT_NAMES = {"unet": "UNet", "controlnet": "ControlNet", "vae": "VAE", "text_encoder": "CLIP text encoder"}
# Training-only state some LDM checkpoints carry: EMA shadow weights (cldm_v15 has use_ema False).
IGNORED_PREFIXES = ("model_ema.",)
SHOWN_KEYS = 5


@dataclass(frozen=True)
class LdmHints:
    """What an LDM checkpoint's weights don't say. Defaults are cldm_v15.yaml / FrozenCLIPEmbedder (ViT-L/14)."""

    unet_heads: int = 8
    unet_head_channels: int = -1  # LDM's num_head_channels: when > 0 it fixes the head width instead of the count
    control_heads: int = 8
    control_head_channels: int = -1
    text_heads: "int | None" = None  # None: 12 for a 768-wide text model, else hidden // 64
    text_hidden_act: str = "quick_gelu"
    norm_num_groups: int = LDM_NORM_GROUPS
    vae_norm_num_groups: int = LDM_NORM_GROUPS
    scale_factor: float = LDM_SCALE_FACTOR
    unet_sample_size: int = 64  # model.params.image_size (the latent size); unet_config's image_size is unused
    vae_sample_size: int = 256


def read_ldm_config(path: "str | Path") -> LdmHints:
    """Read the hints from a cldm_v15.yaml-layout file (plus its optional `controlnet_rt` section)."""
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
        model = config["model"]["params"]
        unet = model["unet_config"]["params"]
        control = model["control_stage_config"]["params"]
        vae = model.get("first_stage_config", {}).get("params", {}).get("ddconfig", {})
        extra = config.get(YAML_EXTENSION) or {}
        return LdmHints(
            unet_heads=int(unet.get("num_heads", 8)), unet_head_channels=int(unet.get("num_head_channels", -1)),
            control_heads=int(control.get("num_heads", 8)),
            control_head_channels=int(control.get("num_head_channels", -1)),
            text_heads=int(extra["text_num_heads"]) if "text_num_heads" in extra else None,
            text_hidden_act=str(extra.get("text_hidden_act", "quick_gelu")),
            norm_num_groups=int(extra.get("norm_num_groups", LDM_NORM_GROUPS)),
            vae_norm_num_groups=int(extra.get("vae_norm_num_groups", LDM_NORM_GROUPS)),
            scale_factor=float(model.get("scale_factor", LDM_SCALE_FACTOR)),
            unet_sample_size=int(model.get("image_size", 64)), vae_sample_size=int(vae.get("resolution", 256)),
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ControlNetRTError(f"cannot read the model config {path}: {type(exc).__name__}: {exc}. It must have "
                                "the layout of ControlNet's models/cldm_v15.yaml (model.params.unet_config / "
                                "control_stage_config); fix or delete it") from exc


def read_ldm_state_dict(path: "str | Path") -> dict[str, torch.Tensor]:
    """The raw tensors of a .pth/.ckpt/.pt (weights-only unpickling) or .safetensors file, on the CPU."""
    path = Path(path)
    if path.suffix not in CHECKPOINT_WRITERS:
        raise ControlNetRTError(f"{path} is not a checkpoint: expected one of {', '.join(CHECKPOINT_WRITERS)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = _torch_load(path)
    except Exception as exc:  # torch / pickle / zipfile / safetensors each raise their own types for a bad file
        hint = ("it holds pickled objects besides tensors: re-save its state_dict with torch.save, or convert it to "
                ".safetensors" if "weights_only" in str(exc) else "the file is truncated or corrupt: download or "
                "export it again")
        raise ControlNetRTError(f"cannot read checkpoint {path}: {type(exc).__name__}: {_first_line(exc)}; "
                                f"{hint}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # PyTorch Lightning .ckpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ControlNetRTError(f"checkpoint {path} is not a state dict of tensors (nor has one under 'state_dict'): "
                                "pass an original ControlNet checkpoint such as control_sd15_canny.pth")
    return state


def _torch_load(path: Path):
    try:
        # mmap (private, copy-on-write): the networks are assigned these tensors, so the 5.7 GB canny checkpoint
        # is paged in on first use instead of copied
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) torch.save format


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch bolds parts of its messages
    line = text.splitlines()[0] if text else "(no message)"
    return line if len(line) <= limit else line[:limit] + " ..."


def load_ldm_checkpoint(path: "str | Path", config: "str | Path | None" = None) -> dict[str, torch.nn.Module]:
    """Build the UNet, ControlNet, VAE (diffusers) and CLIP text encoder (transformers), fp32, from an original
    ControlNet checkpoint. `config` defaults to `<stem>.yaml` beside the checkpoint when that exists."""
    path = Path(path)
    if config is None and path.with_suffix(".yaml").is_file():
        config = path.with_suffix(".yaml")
    hints = read_ldm_config(config) if config is not None else LdmHints()
    advice = (f"Check {config} (heads, norm groups)" if config is not None else
              f"No yaml was found, so SD1.5's heads and norm groups were assumed: put the model's "
              f"cldm_v15.yaml-layout config at {path.with_suffix('.yaml')}")
    state = read_ldm_state_dict(path)
    parts = split_components(state, path)
    configs = infer_configs(parts, hints, path)
    built = {name: _instantiate(name, configs[name], path, advice) for name in LDM_PREFIXES}
    nets = {name: module for name, (module, _) in built.items()}
    # every network's key problems in one message: a damaged file rarely breaks only one of them
    problems = [p for name in LDM_PREFIXES if (p := _key_problems(name, nets[name], parts[name]))]
    if problems:
        raise ControlNetRTError(f"checkpoint {path} does not match the architecture inferred from its weights: "
                                f"{'; '.join(problems)}. The file is damaged or not an original SD1.x ControlNet "
                                "checkpoint")
    for name in LDM_PREFIXES:
        _load(name, nets[name], built[name][1], _convert(name, configs[name], state, parts[name]), path, advice)
    return nets


def split_components(state: dict, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per network, its tensors with the checkpoint prefix removed; anything outside the four networks and the
    known schedule / EMA state is an unexpected key."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in LDM_PREFIXES}
    stray = []
    for key, tensor in state.items():
        component = next((name for name, prefix in LDM_PREFIXES.items() if key.startswith(prefix)), None)
        if component is not None:
            parts[component][key[len(LDM_PREFIXES[component]):]] = tensor
        elif key not in SCHEDULE_BUFFERS and not key.startswith(IGNORED_PREFIXES):
            stray.append(key)
    empty = [name for name, part in parts.items() if not part]
    if empty:
        listed = ", ".join(f"{COMPONENT_NAMES[n]} ({LDM_PREFIXES[n]}*)" for n in empty)
        raise ControlNetRTError(f"checkpoint {path} lacks the {listed} weights: pass a full ControlNet checkpoint "
                                "(like control_sd15_canny.pth, made by ControlNet's tool_add_control.py), not a "
                                "ControlNet-only or SD-only file")
    if stray:
        raise ControlNetRTError(f"checkpoint {path} has {len(stray)} unexpected key(s) outside the four networks: "
                                f"{_show(stray)}; it is not an original ControlNet (ControlLDM) checkpoint")
    return parts


def _show(keys) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def _tensor(part: dict, key: str, component: str, path: Path) -> torch.Tensor:
    try:
        return part[key]
    except KeyError:
        raise ControlNetRTError(f"checkpoint {path} lacks {LDM_PREFIXES[component]}{key}, needed to read the "
                                f"{COMPONENT_NAMES[component]} architecture: the file is incomplete or not an "
                                "original ControlNet checkpoint") from None


def _indices(part: dict, prefix: str) -> list[int]:
    """Sorted integer children of `prefix` (e.g. 'input_blocks.' -> [0, 1, ..., 11])."""
    found = set()
    for key in part:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _heads(heads: int, head_channels: int, widths: list[int]):
    # LDM: num_head_channels > 0 fixes the head width (SD2 style); diffusers then wants one head count per level
    return [w // head_channels for w in widths] if head_channels > 0 else heads


def _unet_layout(part: dict, component: str, path: Path, groups: int, heads) -> dict:
    """diffusers keyword arguments shared by the UNet and the ControlNet (models/configs.py's `_unet_common`)."""
    conv_in = _tensor(part, "input_blocks.0.0.weight", component, path)
    blocks = _indices(part, "input_blocks.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in part]
    layers = (downs[0] if downs else len(blocks)) - 1
    levels = len(blocks) // (layers + 1) if layers > 0 else 0
    # LDM's encoder: conv_in, then per level `layers` blocks and (except the last level) one downsample
    if layers < 1 or blocks != list(range(levels * (layers + 1))) or downs != [
            (level + 1) * (layers + 1) for level in range(levels - 1)]:
        raise ControlNetRTError(f"checkpoint {path}: the {COMPONENT_NAMES[component]} input blocks {blocks} "
                                f"(downsamplers at {downs}) are not an SD-style layout this loader supports")
    firsts = [1 + level * (layers + 1) for level in range(levels)]
    widths = [int(_tensor(part, f"input_blocks.{i}.0.out_layers.3.weight", component, path).shape[0])
              for i in firsts]
    attention = [any(k.startswith(f"input_blocks.{i}.1.") for k in part) for i in firsts]
    transformer = next((f"input_blocks.{i}.1." for i, a in zip(firsts, attention) if a), "middle_block.1.")
    context = _tensor(part, transformer + "transformer_blocks.0.attn2.to_k.weight", component, path)
    proj_in = _tensor(part, transformer + "proj_in.weight", component, path)
    depth = len(_indices(part, transformer + "transformer_blocks."))
    layout = dict(
        in_channels=int(conv_in.shape[1]),
        block_out_channels=widths,
        layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        norm_num_groups=groups,
        norm_eps=1e-5,
        cross_attention_dim=int(context.shape[1]),
        attention_head_dim=heads(widths),
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        act_fn="silu",
    )
    if depth != 1:
        layout["transformer_layers_per_block"] = depth
    if proj_in.ndim == 2:  # SD2's use_linear_in_transformer
        layout["use_linear_projection"] = True
    return layout


def _unet_config(part: dict, hints: LdmHints, path: Path) -> dict:
    layout = _unet_layout(part, "unet", path, hints.norm_num_groups,
                          lambda widths: _heads(hints.unet_heads, hints.unet_head_channels, widths))
    out = _tensor(part, "out.2.weight", "unet", path)
    up_types = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D"
                for t in reversed(layout["down_block_types"])]
    return dict(layout, out_channels=int(out.shape[0]), up_block_types=up_types,
                sample_size=hints.unet_sample_size, center_input_sample=False, mid_block_scale_factor=1)


def _controlnet_config(part: dict, hints: LdmHints, path: Path) -> dict:
    layout = _unet_layout(part, "controlnet", path, hints.norm_num_groups,
                          lambda widths: _heads(hints.control_heads, hints.control_head_channels, widths))
    convs = _indices(part, "input_hint_block.")
    # Sequential(conv, SiLU, ...): convs at even indices; diffusers' converter expects the zero conv at 14
    if convs != list(range(0, 16, 2)):
        raise ControlNetRTError(f"checkpoint {path}: ControlNet input_hint_block has convs at {convs}, expected "
                                "0, 2, ..., 14 as in cldm_v15.yaml")
    outs = [int(_tensor(part, f"input_hint_block.{i}.weight", "controlnet", path).shape[0]) for i in convs[:-1]]
    hint_in = _tensor(part, "input_hint_block.0.weight", "controlnet", path)
    return dict(layout, conditioning_embedding_out_channels=[outs[0], *outs[2::2]],
                controlnet_conditioning_channel_order="rgb", conditioning_channels=int(hint_in.shape[1]))


def _vae_config(part: dict, hints: LdmHints, path: Path) -> dict:
    levels = _indices(part, "encoder.down.")
    layers = len(_indices(part, "encoder.down.0.block."))
    widths = [int(_tensor(part, f"encoder.down.{i}.block.0.conv2.weight", "vae", path).shape[0]) for i in levels]
    conv_in = _tensor(part, "encoder.conv_in.weight", "vae", path)
    z_channels = int(_tensor(part, "decoder.conv_in.weight", "vae", path).shape[1])
    embed_dim = int(_tensor(part, "post_quant_conv.weight", "vae", path).shape[0])
    if embed_dim != z_channels:
        raise ControlNetRTError(f"checkpoint {path}: VAE embed_dim {embed_dim} != z_channels {z_channels}, "
                                "which diffusers' AutoencoderKL cannot express")
    return dict(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(_tensor(part, "decoder.conv_out.weight", "vae", path).shape[0]),
        latent_channels=z_channels,
        block_out_channels=widths,
        down_block_types=["DownEncoderBlock2D"] * len(widths),
        up_block_types=["UpDecoderBlock2D"] * len(widths),
        layers_per_block=layers,
        norm_num_groups=hints.vae_norm_num_groups,
        act_fn="silu",
        sample_size=hints.vae_sample_size,
        scaling_factor=hints.scale_factor,
    )


def _text_part(part: dict) -> dict:
    """CLIP keys as the current CLIPTextModel names them: no `text_model.` level, no position_ids buffer."""
    out = {}
    for key, tensor in part.items():
        key = key[len(CLIP_TEXT_MODEL_PREFIX):] if key.startswith(CLIP_TEXT_MODEL_PREFIX) else key
        if key != CLIP_POSITION_IDS:
            out[key] = tensor
    return out


def _text_config(part: dict, hints: LdmHints, path: Path) -> dict:
    part = _text_part(part)
    tokens = _tensor(part, "embeddings.token_embedding.weight", "text_encoder", path)
    positions = _tensor(part, "embeddings.position_embedding.weight", "text_encoder", path)
    hidden = int(tokens.shape[1])
    heads = hints.text_heads if hints.text_heads is not None else (12 if hidden == 768 else max(1, hidden // 64))
    return dict(
        vocab_size=int(tokens.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(_tensor(part, "encoder.layers.0.mlp.fc1.weight", "text_encoder", path).shape[0]),
        num_hidden_layers=len(_indices(part, "encoder.layers.")),
        num_attention_heads=heads,
        max_position_embeddings=int(positions.shape[0]),
        hidden_act=hints.text_hidden_act,
        projection_dim=hidden,
    )


def infer_configs(parts: dict, hints: LdmHints, path: "str | Path" = "<checkpoint>") -> dict[str, dict]:
    """diffusers / transformers config keyword arguments for each network, read from the weight shapes."""
    path = Path(path)
    return {
        "unet": _unet_config(parts["unet"], hints, path),
        "controlnet": _controlnet_config(parts["controlnet"], hints, path),
        "vae": _vae_config(parts["vae"], hints, path),
        "text_encoder": _text_config(parts["text_encoder"], hints, path),
    }


def _empty_weights():
    """Parameters on the meta device (buffers real) when accelerate is there: the checkpoint's tensors are then
    assigned instead of copied over a random init, which is 20 s of the 27 s an SD1.5 load takes on 2 CPU cores."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return contextlib.nullcontext(), False
    return init_empty_weights(include_buffers=False), True


def _instantiate(component: str, config: dict, path: Path, advice: str) -> "tuple[torch.nn.Module, bool]":
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    classes = {"unet": UNet2DConditionModel, "controlnet": ControlNetModel, "vae": AutoencoderKL}
    context, empty = _empty_weights()
    try:
        with context:
            if component == "text_encoder":
                return CLIPTextModel(CLIPTextConfig(**config)), empty
            return classes[component](**config), empty
    except Exception as exc:  # diffusers / torch validate configs with ValueError / TypeError / AssertionError
        raise ControlNetRTError(f"checkpoint {path}: cannot build the {COMPONENT_NAMES[component]} inferred from "
                                f"its weights ({config}): {type(exc).__name__}: {exc}. {advice}") from exc


def _convert(component: str, config: dict, state: dict, part: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders import single_file_utils as sfu

    if component == "unet":
        return sfu.convert_ldm_unet_checkpoint(state, config)
    if component == "controlnet":
        return sfu.convert_controlnet_checkpoint(state, config)
    if component == "vae":
        return sfu.convert_ldm_vae_checkpoint(state, config)
    # convert_ldm_clip_checkpoint only strips `cond_stage_model.transformer.`; the rest is transformers' renaming
    return _text_part(sfu.convert_ldm_clip_checkpoint({LDM_PREFIXES[component] + k: v for k, v in part.items()}))


def _load(component: str, module, empty: bool, converted: dict, path: Path, advice: str) -> None:
    # fp16 checkpoints still give fp32 networks; .float() returns fp32 tensors themselves, uncopied
    converted = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    try:
        module.load_state_dict(converted, strict=True, assign=empty)
    except RuntimeError as exc:
        raise ControlNetRTError(f"checkpoint {path}: the {COMPONENT_NAMES[component]} weights do not fit the "
                                f"architecture inferred from them: {_first_lines(exc)}. {advice}, or re-export "
                                "the checkpoint") from exc
    module.eval()


def _key_problems(component: str, module, part: dict) -> str:
    """The checkpoint's keys against those the inferred network needs, in LDM names ('' when they agree)."""
    prefix = LDM_PREFIXES[component]
    expected = {ldm[len(prefix):] for ldm in ldm_key_map(component, module).values()}
    present = set(part)
    if component == "text_encoder":
        # older transformers (as used by the original ControlNet) had the text_model. level and position_ids
        present = {k if k.startswith(CLIP_TEXT_MODEL_PREFIX) else CLIP_TEXT_MODEL_PREFIX + k for k in present}
        present.discard(CLIP_TEXT_MODEL_PREFIX + CLIP_POSITION_IDS)
    missing, unexpected = expected - present, present - expected
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_show(prefix + k for k in missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_show(prefix + k for k in unexpected)}")
    return f"{COMPONENT_NAMES[component]} has {' and '.join(problems)}" if problems else ""


def _first_lines(exc: BaseException, count: int = 4) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines[:count]) + (" ..." if len(lines) > count else "")

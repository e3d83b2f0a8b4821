"""Original ControlNet checkpoints (LDM key names): export -> import round trip, architecture inference, errors.

The tiny synthetic bundle is written with `save_ldm_checkpoint` (.pth and .safetensors, yaml beside), read back with
`load_ldm_checkpoint`, and compared with the bundle: every tensor and every config value must be identical, hence
the networks' outputs too (same weights, same modules, same CPU kernels: compared with zero tolerance).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from models import load_bundle
from models.ldm_checkpoint import (
    LdmHints,
    infer_configs,
    load_ldm_checkpoint,
    read_ldm_config,
    read_ldm_state_dict,
    split_components,
)
from models.ldm_export import LDM_PREFIXES, ldm_state_dict, ldm_yaml_config, save_ldm_checkpoint, schedule_buffers
from profiles.errors import ControlNetRTError
from scheduler.ddim import alphas_cumprod

SUFFIXES = (".pth", ".safetensors")
EXACT = dict(rtol=0.0, atol=0.0)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return load_bundle("synthetic-tiny", cache_root=tmp_path_factory.mktemp("ldm_weights"))


@pytest.fixture(scope="session")
def exported(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ldm_export")
    return {suffix: save_ldm_checkpoint(tiny, root / suffix[1:] / f"control_tiny{suffix}") for suffix in SUFFIXES}


@pytest.fixture(scope="session")
def loaded(exported) -> dict[str, dict]:
    return {suffix: load_ldm_checkpoint(path) for suffix, path in exported.items()}


def _config(module) -> dict:
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("dtype", "architectures")}


def _write_state(state: dict, path: Path, yaml_from: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    shutil.copy(yaml_from.with_suffix(".yaml"), path.with_suffix(".yaml"))
    return path


def test_export_writes_original_key_names(exported):
    state = read_ldm_state_dict(exported[".safetensors"])
    for key in ("control_model.input_hint_block.14.weight", "control_model.zero_convs.11.0.weight",
                "control_model.middle_block_out.0.weight", "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight", "alphas_cumprod", "logvar"):
        assert key in state, key
    # LDM's VAE attention uses 1x1 convs; CLIP's position ids are kept for the original (transformers 4.19) code
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)
    ids = state["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and ids.tolist() == [list(range(77))]
    assert torch.equal(state["alphas_cumprod"], alphas_cumprod()) and set(schedule_buffers()) <= set(state)
    config = yaml.safe_load(exported[".pth"].with_suffix(".yaml").read_text())
    control = config["model"]["params"]["control_stage_config"]["params"]
    assert control["num_heads"] == 2 and control["channel_mult"] == [1, 1, 2, 2]
    assert control["attention_resolutions"] == [4, 2, 1] and control["hint_channels"] == 3


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_is_exact(tiny, loaded, suffix):
    nets = loaded[suffix]
    for name, original in tiny.modules().items():
        assert type(nets[name]) is type(original)
        assert _config(nets[name]) == _config(original), name
        want, got = original.state_dict(), nets[name].state_dict()
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():
            assert got[key].dtype == torch.float32 and torch.equal(got[key], tensor), f"{name}.{key}"


@torch.no_grad()
def _outputs(nets: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 12, generator=g)
    hint = (torch.rand(2, 3, 64, 96, generator=g) > 0.8).float()
    tokens = torch.randint(0, 49408, (2, 77), generator=g)
    t = torch.tensor([951.0, 1.0])
    context = nets["text_encoder"](tokens).last_hidden_state
    down, mid = nets["controlnet"](x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    eps = nets["unet"](x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    image = nets["vae"].decode(x / nets["vae"].config.scaling_factor).sample
    return {"context": context, "control_mid": mid, "eps": eps, "image": image}


def test_round_trip_outputs_match(tiny, loaded):
    want = _outputs(tiny.modules())
    for suffix in SUFFIXES:
        got = _outputs(loaded[suffix])
        for name in want:
            torch.testing.assert_close(got[name], want[name], **EXACT, msg=f"{suffix} {name}")


def test_load_bundle_reads_checkpoint(exported, tmp_path):
    bundle = load_bundle(str(exported[".pth"]), cache_root=tmp_path)
    assert bundle.weights_id.startswith("sha256-") and bundle.source == str(exported[".pth"])
    assert bundle.context_dim == 32 and bundle.controlnet.config.block_out_channels[0] == 32
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    assert bundle.unet.config.attention_head_dim == 2  # from control_tiny.yaml beside the file


def test_heads_and_groups_come_from_yaml(exported, tmp_path):
    source = exported[".safetensors"]
    lonely = tmp_path / "alone" / source.name
    lonely.parent.mkdir()
    shutil.copy(source, lonely)
    # without a yaml, LDM's GroupNorm32 does not divide the tiny VAE's 16 channels: the error names the yaml
    with pytest.raises(ControlNetRTError, match=r"yaml"):
        load_ldm_checkpoint(lonely)
    config = yaml.safe_load(source.with_suffix(".yaml").read_text())
    config["model"]["params"]["control_stage_config"]["params"]["num_heads"] = 4
    config["controlnet_rt"]["text_num_heads"] = 1
    explicit = tmp_path / "elsewhere.yaml"
    explicit.write_text(yaml.safe_dump(config))
    nets = load_ldm_checkpoint(lonely, config=explicit)
    assert nets["controlnet"].config.attention_head_dim == 4
    assert nets["unet"].config.attention_head_dim == 2
    assert nets["text_encoder"].config.num_attention_heads == 1


def test_original_yaml_layout_gives_sd15_defaults(tmp_path):
    path = tmp_path / "cldm_v15.yaml"
    path.write_text(
        "model:\n  target: cldm.cldm.ControlLDM\n  params:\n    scale_factor: 0.18215\n    image_size: 64\n"
        "    control_stage_config:\n      target: cldm.cldm.ControlNet\n      params:\n        num_heads: 8\n"
        "    unet_config:\n      target: cldm.cldm.ControlledUnetModel\n      params:\n        image_size: 32\n"
        "        num_heads: 8\n")
    assert read_ldm_config(path) == LdmHints()
    (tmp_path / "bad.yaml").write_text("model: [1, 2")
    with pytest.raises(ControlNetRTError, match="bad.yaml"):
        read_ldm_config(tmp_path / "bad.yaml")


def test_sd15_architecture_inferred_from_shapes():
    """The full-size layout, on the meta device (shapes only): SD1.5 defaults need no yaml."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.configs import get_architecture

    arch = get_architecture("sd15")
    with torch.device("meta"):
        nets = {"unet": UNet2DConditionModel(**arch.unet), "controlnet": ControlNetModel(**arch.controlnet),
                "vae": AutoencoderKL(**arch.vae), "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.text_encoder))}
    state = ldm_state_dict(nets)
    assert state["control_model.input_hint_block.14.weight"].shape == (320, 256, 3, 3)
    configs = infer_configs(split_components(state, Path("control_sd15_canny.pth")), LdmHints())
    assert configs == {"unet": arch.unet, "controlnet": arch.controlnet, "vae": arch.vae,
                       "text_encoder": arch.text_encoder}
    config = ldm_yaml_config(nets)["model"]["params"]
    assert config["unet_config"]["params"]["channel_mult"] == [1, 2, 4, 4]
    assert config["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 2, 4, 4]


def test_lightning_wrapper_and_old_clip_names_load(tiny, exported, tmp_path):
    state = read_ldm_state_dict(exported[".pth"])
    clip = LDM_PREFIXES["text_encoder"]
    # transformers < 4.x had no `text_model.` level; Lightning .ckpt files nest the weights under "state_dict"
    old = {(clip + k[len(clip + "text_model."):] if k.startswith(clip) else k): v for k, v in state.items()}
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": old, "global_step": 5}, path)
    shutil.copy(exported[".pth"].with_suffix(".yaml"), path.with_suffix(".yaml"))
    nets = load_ldm_checkpoint(path)
    for key, tensor in tiny.text_encoder.state_dict().items():
        assert torch.equal(nets["text_encoder"].state_dict()[key], tensor), key


def test_fp16_checkpoint_gives_fp32_networks(tiny, exported, tmp_path):
    state = read_ldm_state_dict(exported[".pth"])
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    nets = load_ldm_checkpoint(_write_state(half, tmp_path / "half.pth", exported[".pth"]))
    for key, tensor in tiny.controlnet.state_dict().items():
        got = nets["controlnet"].state_dict()[key]
        assert got.dtype == torch.float32 and torch.equal(got, tensor.half().float()), key


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_corrupt_file_is_reported(exported, tmp_path, suffix):
    data = exported[suffix].read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"\x00not a checkpoint" * 64)):
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(ControlNetRTError, match=f"{name}{suffix}"):
            load_ldm_checkpoint(path)


@pytest.mark.parametrize("edit, words", [
    ("drop", ["missing", "control_model.zero_convs.3.0.weight", "first_stage_model.decoder.conv_out.bias"]),
    ("extra", ["unexpected", "control_model.zero_convs.12.0.weight"]),
    ("stray", ["unexpected", "something_else.weight"]),
    ("no_vae", ["VAE", "first_stage_model."]),
    ("no_conv_in", ["control_model.input_blocks.0.0.weight"]),
    ("reshaped", ["do not fit", "size mismatch"]),
])
def test_key_problems_are_reported(exported, tmp_path, edit, words):
    state = read_ldm_state_dict(exported[".pth"])
    if edit == "drop":
        del state["control_model.zero_convs.3.0.weight"], state["first_stage_model.decoder.conv_out.bias"]
    elif edit == "extra":
        state["control_model.zero_convs.12.0.weight"] = torch.zeros(64, 64, 1, 1)
    elif edit == "stray":
        state["something_else.weight"] = torch.zeros(1)
    elif edit == "no_vae":
        state = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    elif edit == "no_conv_in":
        del state["control_model.input_blocks.0.0.weight"]
    else:
        key = "model.diffusion_model.middle_block.0.in_layers.2.weight"
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1, 3, 3)
    path = _write_state(state, tmp_path / f"broken_{edit}.pth", exported[".pth"])
    with pytest.raises(ControlNetRTError) as info:
        load_ldm_checkpoint(path)
    message = str(info.value)
    assert path.name in message
    for word in words:
        assert word in message, message


def test_export_rejects_unknown_suffix(tiny, tmp_path):
    with pytest.raises(ControlNetRTError, match=".bin"):
        save_ldm_checkpoint(tiny, tmp_path / "model.bin")

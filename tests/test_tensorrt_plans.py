"""The plan build's bookkeeping, without TensorRT: ONNX I/O checks against the contract, the manifest key and
which plans are stale. The ONNX files here are tiny real graphs with the contract's tensor names and shapes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from artifacts import Manifest
from engines.tensorrt.onnx_io import check_onnx_dir, check_onnx_io, contract_dims, read_onnx_io
from engines.tensorrt.plans import onnx_hashes, onnx_weights_id, plan_key, stale_networks
from engines.tensorrt.settings import NETWORKS, BuildOptions, build_settings, plan_path
from models.step import NETWORK_OUTPUTS, network_io
from profiles import ControlNetRTError, get_profile

CONTEXT_DIM, HINT_CHANNELS = 32, 32  # the tiny architecture
PROFILE = get_profile("256x384-fp16")
TORCH_TO_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                 torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.uint8: TensorProto.UINT8}
NUMPY = {torch.float32: np.float32, torch.uint8: np.uint8}


def write_network(path, io, outputs, overrides=None, output_shapes=True, initializer_inputs=False):
    """A valid ONNX graph with `io`'s inputs and outputs (each output an Identity of a zero constant).
    `overrides`: name -> (shape, torch dtype) to break the contract on purpose."""
    overrides = overrides or {}
    spec = {name: overrides.get(name, (tuple(s.shape), s.dtype)) for name, s in io.items()}
    inputs = [helper.make_tensor_value_info(n, TORCH_TO_ONNX[d], list(s)) for n, (s, d) in spec.items()
              if n not in outputs]
    graph_outputs, nodes, inits = [], [], []
    for name in outputs:
        shape, dtype = spec[name]
        inits.append(numpy_helper.from_array(np.zeros(shape, NUMPY[dtype]), f"{name}_const"))
        nodes.append(helper.make_node("Identity", [f"{name}_const"], [name]))
        dims = list(shape) if output_shapes else [f"{name}_{i}" for i in range(len(shape))]  # symbolic
        graph_outputs.append(helper.make_tensor_value_info(name, TORCH_TO_ONNX[dtype], dims))
    if initializer_inputs:  # old exporters also list initializers as graph inputs
        inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
    graph = helper.make_graph(nodes, path.stem, inputs, graph_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_onnx_dir(directory, profile=PROFILE, weights_id="sha256-test", **kwargs):
    directory.mkdir(parents=True, exist_ok=True)
    io = network_io(profile, CONTEXT_DIM, HINT_CHANNELS)
    manifest = Manifest({"kind": "onnx", "weights_id": weights_id})
    for network in NETWORKS:
        path = write_network(directory / f"{network}.onnx", io[network], NETWORK_OUTPUTS[network], **kwargs)
        manifest.record(directory, network, path)
    manifest.save(directory)
    return directory


def test_contract_files_pass_and_give_the_dims(tmp_path):
    onnx_dir = write_onnx_dir(tmp_path / "onnx", initializer_inputs=True)
    assert contract_dims(onnx_dir / "fused_step.onnx") == (CONTEXT_DIM, HINT_CHANNELS)
    assert check_onnx_dir(onnx_dir, PROFILE, NETWORKS) == (CONTEXT_DIM, HINT_CHANNELS)
    inputs, outputs = read_onnx_io(onnx_dir / "text_encoder.onnx")
    assert list(inputs) == ["input_ids"] and inputs["input_ids"].dtype is torch.int64  # initializers left out
    assert outputs["context"].shape == (2, 77, CONTEXT_DIM)


def test_symbolic_output_dims_pass(tmp_path):
    onnx_dir = write_onnx_dir(tmp_path / "onnx", output_shapes=False)
    check_onnx_dir(onnx_dir, PROFILE, NETWORKS)


def test_files_of_another_profile_fail(tmp_path):
    onnx_dir = write_onnx_dir(tmp_path / "onnx", profile=get_profile("512x512-fp16"))
    with pytest.raises(ControlNetRTError, match=r"input hint is \(1, 3, 512, 512\).*expected \(1, 3, 256, 384\)"):
        check_onnx_dir(onnx_dir, PROFILE, NETWORKS)


@pytest.mark.parametrize("network, overrides, match", [
    ("text_encoder", {"input_ids": ((2, 77), torch.int32)}, "input input_ids .* torch.int32, expected .* torch.int64"),
    ("vae_decoder", {"image": ((1, 256, 384, 3), torch.float32)}, "output image is torch.float32"),
    ("hint_encoder", {"hint_features": ((1, 16, 32, 48), torch.float32)}, "output hint_features is"),
])
def test_contract_breaks_are_named(tmp_path, network, overrides, match):
    io = network_io(PROFILE, CONTEXT_DIM, HINT_CHANNELS)[network]
    path = write_network(tmp_path / f"{network}.onnx", io, NETWORK_OUTPUTS[network], overrides)
    with pytest.raises(ControlNetRTError, match=match):
        check_onnx_io(path, io, NETWORK_OUTPUTS[network])


def test_renamed_tensor_fails(tmp_path):
    io = network_io(PROFILE, CONTEXT_DIM, HINT_CHANNELS)["vae_decoder"]
    path = write_network(tmp_path / "vae_decoder.onnx", io, NETWORK_OUTPUTS["vae_decoder"])
    with pytest.raises(ControlNetRTError, match="outputs"):
        check_onnx_io(path, io, ("pixels",))


def test_missing_or_broken_file_says_what_to_do(tmp_path):
    with pytest.raises(ControlNetRTError, match="export the ONNX files first"):
        read_onnx_io(tmp_path / "fused_step.onnx")
    (tmp_path / "fused_step.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ControlNetRTError, match="re-export"):
        read_onnx_io(tmp_path / "fused_step.onnx")


def _key(onnx_dir, plan_dir, profile=PROFILE, trt_version="10.13.0", refit=False):
    settings = {n: build_settings(profile, n, CONTEXT_DIM, HINT_CHANNELS, plan_dir, BuildOptions(refit=refit))
                for n in NETWORKS}
    manifest = Manifest.load(onnx_dir)
    return plan_key(profile, onnx_weights_id(manifest), onnx_hashes(onnx_dir, manifest, NETWORKS), trt_version,
                    {"name": "NVIDIA H100", "capability": "9.0"}, settings)


def _fake_build(plan_dir, key, networks=NETWORKS):
    """Stand-in plan files (bytes, not engines) recorded the way build_tensorrt_plans records real ones."""
    manifest = Manifest.load(plan_dir)
    manifest = manifest if manifest is not None and manifest.key == key else Manifest(key)
    for network in networks:
        path = plan_path(plan_dir, network)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"plan of {network}".encode())
        manifest.record(plan_dir, network, path)
    manifest.save(plan_dir)


def test_plan_key_survives_a_save_and_load(tmp_path):
    onnx_dir, plan_dir = write_onnx_dir(tmp_path / "onnx"), tmp_path / "plans"
    key = _key(onnx_dir, plan_dir)
    _fake_build(plan_dir, key)
    assert Manifest.load(plan_dir).key == key  # tuples were normalised to lists before saving
    assert key["weights_id"] == "sha256-test" and key["profile"]["precision"] == "fp16"
    assert set(key["onnx_sha256"]) == {f"{n}.onnx" for n in NETWORKS}
    assert key["settings"]["fused_step"]["input_shapes"]["context"] == [2, 77, CONTEXT_DIM]


def test_staleness(tmp_path):
    onnx_dir, plan_dir = write_onnx_dir(tmp_path / "onnx"), tmp_path / "plans"
    key = _key(onnx_dir, plan_dir)
    assert stale_networks(Manifest.load(plan_dir), plan_dir, key, NETWORKS) == list(NETWORKS)
    _fake_build(plan_dir, key, ["text_encoder", "hint_encoder"])  # an interrupted build
    assert stale_networks(Manifest.load(plan_dir), plan_dir, key, NETWORKS) == ["fused_step", "vae_decoder"]
    _fake_build(plan_dir, key)
    assert stale_networks(Manifest.load(plan_dir), plan_dir, key, NETWORKS) == []
    plan_path(plan_dir, "vae_decoder").write_bytes(b"truncated")
    assert stale_networks(Manifest.load(plan_dir), plan_dir, key, NETWORKS) == ["vae_decoder"]
    # Anything in the key changing makes every plan stale.
    for other in (_key(onnx_dir, plan_dir, trt_version="11.4.0"), _key(onnx_dir, plan_dir, refit=True),
                  _key(onnx_dir, plan_dir, replace(PROFILE, trt_optimization_level=5))):
        assert other != key
        assert stale_networks(Manifest.load(plan_dir), plan_dir, other, NETWORKS) == list(NETWORKS)


def test_new_onnx_weights_change_the_key(tmp_path):
    onnx_dir, plan_dir = write_onnx_dir(tmp_path / "onnx"), tmp_path / "plans"
    key = _key(onnx_dir, plan_dir)
    write_onnx_dir(onnx_dir, weights_id="sha256-other")
    assert _key(onnx_dir, plan_dir)["weights_id"] == "sha256-other" and _key(onnx_dir, plan_dir) != key


def test_onnx_hashes_fall_back_to_hashing(tmp_path):
    onnx_dir = write_onnx_dir(tmp_path / "onnx")
    recorded = onnx_hashes(onnx_dir, Manifest.load(onnx_dir), NETWORKS)
    assert onnx_hashes(onnx_dir, None, NETWORKS) == recorded
    (onnx_dir / "vae_decoder.onnx").unlink()
    with pytest.raises(ControlNetRTError, match="vae_decoder.onnx not found"):
        onnx_hashes(onnx_dir, None, NETWORKS)


def test_weights_id_is_required():
    assert onnx_weights_id(Manifest({"weights_id": "sha256-ab"})) == "sha256-ab"
    with pytest.raises(ControlNetRTError, match="weights id"):
        onnx_weights_id(Manifest({"kind": "onnx"}))

"""The four plans of a profile, built from `build/<profile>/onnx/` into a plan folder, cached by a manifest.

A plan is reused only when the manifest key matches: the profile, the weights id and sha256 of each ONNX file (from
the ONNX folder's manifest), the TensorRT version, the GPU (plans are specific to both) and every BuildSettings
value; and when the plan file still has its recorded hash. Anything else rebuilds. The manifest is saved after each
plan, so an interrupted build keeps the plans it finished.
"""

from __future__ import annotations

import json
from pathlib import Path

from artifacts import Manifest, file_sha256
from engines.tensorrt.settings import NETWORKS, BuildOptions, build_settings, layer_info_path, plan_path
from profiles.config import Profile
from profiles.errors import ControlNetRTError

MANIFEST_FORMAT = 1


def profile_key(profile: Profile) -> dict:
    return {"name": profile.name, "height": profile.height, "width": profile.width,
            "precision": profile.precision.value, "num_samples": profile.num_samples,
            "ddim_steps": profile.ddim_steps, "trt_optimization_level": profile.trt_optimization_level}


def onnx_weights_id(onnx_manifest: Manifest) -> str:
    key = onnx_manifest.key
    for name in ("weights_id", "weights"):
        if isinstance(key.get(name), str):
            return key[name]
    raise ControlNetRTError("the ONNX manifest names no weights id (key 'weights_id'): re-export the ONNX files")


def onnx_hashes(onnx_dir: Path, onnx_manifest: "Manifest | None", networks) -> dict[str, str]:
    """sha256 of every ONNX artifact: all records of the ONNX manifest (so external weight files count too when it
    records them), and each network's .onnx hashed here when the manifest lacks it."""
    hashes = {}
    if onnx_manifest is not None:
        hashes = {rec.path: rec.sha256 for rec in onnx_manifest.artifacts.values()}
    for network in networks:
        path = onnx_dir / f"{network}.onnx"
        if not path.is_file():
            raise ControlNetRTError(f"{path} not found: export the ONNX files for this profile first")
        if path.name not in hashes:
            hashes[path.name] = file_sha256(path)
    return hashes


def plan_key(profile: Profile, weights_id: str, onnx_sha256: dict, tensorrt_version: str, gpu: dict,
             settings: dict) -> dict:
    """The manifest key, normalised through JSON so a saved-and-loaded key compares equal (tuples -> lists)."""
    key = {"format": MANIFEST_FORMAT, "profile": profile_key(profile), "weights_id": weights_id,
           "onnx_sha256": onnx_sha256, "tensorrt": tensorrt_version, "gpu": gpu,
           "settings": {name: s.as_key() if hasattr(s, "as_key") else s for name, s in settings.items()}}
    return json.loads(json.dumps(key, sort_keys=True))


def stale_networks(manifest: "Manifest | None", plan_dir: Path, key: dict, networks) -> list[str]:
    """The networks whose plan must be (re)built under `key`."""
    if manifest is None or manifest.key != key:
        return list(networks)
    return [n for n in networks if not manifest.is_fresh(plan_dir, key, [n])]


def gpu_identity(device=None) -> dict:
    import torch

    index = torch.device(device or "cuda").index
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}


def build_tensorrt_plans(onnx_dir: "str | Path", plan_dir: "str | Path", profile: Profile, refit: bool = False,
                         options: "BuildOptions | None" = None, networks=NETWORKS, device=None,
                         weights_id: "str | None" = None) -> dict[str, Path]:
    """Build (or reuse) one .plan per network; returns {network: plan path}.

    `weights_id`, when given, must equal the ONNX manifest's: plans of other weights are never silently used.
    """
    from engines.tensorrt.availability import tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        raise ControlNetRTError(why)
    import tensorrt as trt
    import torch

    from engines.tensorrt.builder import build_plan
    from engines.tensorrt.onnx_io import check_onnx_dir

    onnx_dir, plan_dir = Path(onnx_dir), Path(plan_dir)
    options = options or BuildOptions(refit=refit)
    if refit and not options.refit:
        raise ControlNetRTError("refit=True conflicts with options.refit=False: set one of them")
    onnx_manifest = Manifest.load(onnx_dir)
    if onnx_manifest is None:
        raise ControlNetRTError(f"no ONNX manifest in {onnx_dir}: export the ONNX files first (surgery), "
                                "then build the plans")
    onnx_weights = onnx_weights_id(onnx_manifest)
    if weights_id is not None and weights_id != onnx_weights:
        raise ControlNetRTError(f"the ONNX files in {onnx_dir} come from weights {onnx_weights}, not {weights_id}: "
                                "re-export them for these weights")
    context_dim, hint_channels = check_onnx_dir(onnx_dir, profile, networks)
    settings = {n: build_settings(profile, n, context_dim, hint_channels, plan_dir, options) for n in networks}
    key = plan_key(profile, onnx_weights, onnx_hashes(onnx_dir, onnx_manifest, networks), trt.__version__,
                   gpu_identity(device), settings)
    old = Manifest.load(plan_dir)
    todo = stale_networks(old, plan_dir, key, networks)
    manifest = old if old is not None and old.key == key else Manifest(key)
    with torch.cuda.device(torch.device(device or "cuda")):
        for network in todo:
            plan = build_plan(onnx_dir / f"{network}.onnx", plan_path(plan_dir, network), settings[network],
                              layer_info=layer_info_path(plan_dir, network))
            manifest.record(plan_dir, network, plan)
            manifest.save(plan_dir)
    return {n: plan_path(plan_dir, n) for n in networks}


def fresh_prebuilt_plans(plan_dir: "str | Path", profile: Profile, networks=NETWORKS, device=None) -> dict[str, Path]:
    """Plans shipped without their ONNX files: usable only if the manifest says they were built for this
    profile on this TensorRT version and GPU, and every plan still has its recorded hash."""
    import tensorrt as trt

    plan_dir = Path(plan_dir)
    manifest = Manifest.load(plan_dir)
    if manifest is None:
        raise ControlNetRTError(f"no TensorRT plans in {plan_dir} and no ONNX files to build them from: "
                                "run preprocess.sh (ONNX export, then the plan build) first")
    key = manifest.key
    current = {"profile": profile_key(profile), "tensorrt": trt.__version__, "gpu": gpu_identity(device)}
    wrong = [name for name, value in current.items() if key.get(name) != json.loads(json.dumps(value))]
    if wrong or not manifest.is_fresh(plan_dir, key, networks):
        why = f"built for another {', '.join(wrong)}" if wrong else "missing or changed plan files"
        raise ControlNetRTError(f"the plans in {plan_dir} are stale ({why}) and there are no ONNX files to rebuild "
                                "them from: rerun preprocess.sh")
    return {n: plan_path(plan_dir, n) for n in networks}

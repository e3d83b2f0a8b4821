"""The onnxruntime backend: the whole pipeline on the CPU, from the four ONNX files of surgery/.

It exists for correctness, not speed: it runs exactly the graphs TensorRT would build from (the same fused step,
the same glue, the same fp16 casts), so a parity test against the torch modules checks the export and the surgery
on a machine without a GPU. CPUExecutionProvider only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.base import EngineSet
from profiles.config import Profile, get_profile
from profiles.errors import ControlNetRTError
from scheduler.ddim import make_ddim_tables
from surgery.layout import NETWORKS, onnx_paths, profile_key

_PROVIDERS = ["CPUExecutionProvider"]


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ControlNetRTError("the onnxruntime backend needs onnxruntime: `pip install onnxruntime` "
                                "(or choose --backend torch / tensorrt)") from None
    return onnxruntime


class OrtNetwork:
    """One InferenceSession as a tensor -> tensor callable (CPU torch tensors in and out)."""

    def __init__(self, path: Path, threads: "int | None" = None):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.path = path
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=_PROVIDERS)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def shapes(self) -> dict[str, tuple]:
        return {t.name: tuple(t.shape) for t in (*self.session.get_inputs(), *self.session.get_outputs())}

    def run(self, feed: "dict[str, np.ndarray]") -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        (out,) = self.run({self.input_names[0]: _numpy(tensor)})
        return torch.from_numpy(out)


class OrtStepRunner:
    """The fused step over onnxruntime. prepare() keeps the per-image inputs; step(x, k) feeds the schedule's
    timestep and DDIM coefficients for step k from the same tables every backend uses."""

    device = torch.device("cpu")

    def __init__(self, network: OrtNetwork, ddim_steps: int):
        self.network = network
        tables = make_ddim_tables(ddim_steps)
        self._timesteps = [np.array([float(t)], dtype=np.float32) for t in tables.timesteps.tolist()]
        self._coeffs = [row.numpy().astype(np.float32) for row in tables.coeffs]
        self._prepared: "dict[str, np.ndarray] | None" = None

    def prepare(self, context: torch.Tensor, hint_features: torch.Tensor, guidance_scale: float,
                control_scales: torch.Tensor) -> None:
        self._prepared = {
            "context": _numpy(context),
            "hint_features": _numpy(hint_features),
            "guidance_scale": np.array([guidance_scale], dtype=np.float32),
            "control_scales": _numpy(control_scales),
        }

    def step(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if self._prepared is None:
            raise ControlNetRTError("OrtStepRunner.step() called before prepare(): prepare the per-image inputs first")
        if not 0 <= k < len(self._timesteps):
            raise ControlNetRTError(f"step index {k} outside the {len(self._timesteps)}-step schedule")
        feed = dict(self._prepared, x=_numpy(x), timestep=self._timesteps[k], coeffs=self._coeffs[k])
        (x_prev,) = self.network.run(feed)
        return torch.from_numpy(x_prev)


def build_onnxruntime_engines(onnx_dir: "str | Path", profile: "Profile | str", bundle=None, *,
                              threads: "int | None" = None) -> EngineSet:
    """An EngineSet over `onnx_dir` (the output of surgery.build_onnx for `profile`).

    `bundle` (a models.ModelBundle, optional) is only checked against: the files must have been built from its
    weights (manifest) and speak its context and hint widths, else ControlNetRTError says to rebuild. Only its
    metadata is read; the networks themselves are not used. `threads`: onnxruntime intra-op threads (default: all).
    """
    from models.step import network_io

    _onnxruntime()
    profile = get_profile(profile)
    onnx_dir = Path(onnx_dir)
    paths = onnx_paths(onnx_dir)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ControlNetRTError(f"missing ONNX files {missing}: build them with `python3 -m surgery --weights ... "
                                f"--profile {profile.name} --out {onnx_dir}`")
    _check_manifest(onnx_dir, profile, None if bundle is None else bundle.weights_id)
    nets = {name: OrtNetwork(paths[name], threads) for name in NETWORKS}
    if bundle is not None:
        context_dim, hint_channels = bundle.context_dim, int(bundle.controlnet.config.block_out_channels[0])
    else:  # trust the file for the widths; the shapes that the profile fixes are still checked
        step_shapes = nets["fused_step"].shapes()
        context_dim, hint_channels = int(step_shapes["context"][-1]), int(step_shapes["hint_features"][1])
    for name, spec in network_io(profile, context_dim, hint_channels).items():
        got = nets[name].shapes()
        want = {tensor: tuple(s.shape) for tensor, s in spec.items()}
        if got != want:
            raise ControlNetRTError(f"{paths[name]} has I/O {got}, profile {profile.name} needs {want}: rebuild it "
                                    f"with `python3 -m surgery --profile {profile.name} --out {onnx_dir}`")
    return EngineSet(
        text=nets["text_encoder"],
        hint=nets["hint_encoder"],
        step=OrtStepRunner(nets["fused_step"], profile.ddim_steps),
        decode=nets["vae_decoder"],
        device=torch.device("cpu"),
        description=f"onnxruntime {_onnxruntime().__version__} CPU, {profile.name}, {onnx_dir}",
        capturable=False,
    )


def _check_manifest(onnx_dir: Path, profile: Profile, weights_id: "str | None") -> None:
    from artifacts.manifest import Manifest

    manifest = Manifest.load(onnx_dir)
    if manifest is None:
        return  # hand-made files: the I/O shape check still applies
    built_for = manifest.key.get("profile", {})
    # Precision may differ from the profile's on purpose (build_onnx(precision=...)); shapes may not.
    wanted = {k: v for k, v in profile_key(profile).items() if k != "precision"}
    if {k: built_for.get(k) for k in wanted} != wanted:
        raise ControlNetRTError(f"{onnx_dir} was built for profile {built_for}, not {wanted}: rebuild with "
                                f"`python3 -m surgery --profile {profile.name} --out {onnx_dir}`")
    unrecorded = [n for n in NETWORKS if n not in manifest.artifacts]
    if unrecorded:  # build_onnx drops a network's record before rewriting it: an interrupted build
        raise ControlNetRTError(f"the ONNX build in {onnx_dir} is incomplete ({', '.join(unrecorded)} not recorded "
                                f"in its manifest): rerun `python3 -m surgery --profile {profile.name} "
                                f"--out {onnx_dir}`")
    if weights_id is not None and manifest.key.get("weights_id") != weights_id:
        raise ControlNetRTError(f"{onnx_dir} was built from weights {manifest.key.get('weights_id')}, not "
                                f"{weights_id}: rebuild with `python3 -m surgery --weights ... --out {onnx_dir}`")


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


__all__ = ["OrtNetwork", "OrtStepRunner", "build_onnxruntime_engines"]

"""torch modules (models/step.py) -> ONNX files, one per exported part, with static shapes from the profile.

Parts: `controlnet` (ControlNetResiduals at batch 2B -> 13 residuals), `unet` (ControlledUNet taking the 13 controls
-> eps), `update` (GuidedDDIMUpdate: CFG + DDIM), which surgery/fuse.py merges into the fused step, and the three
stand-alone networks `text_encoder`, `hint_encoder`, `vae_decoder` with the I/O names of `models.step.network_io`.

Exporter: the TorchScript exporter (`dynamo=False`), chosen deliberately. In torch 2.13 it still works (with a
deprecation warning), exports these networks in well under a second each for the tiny model, needs no onnxscript
(maybe absent on the GPU machine), keeps module-scoped node names (`/net/down_blocks.0/...`) that make the graph
readable, and emits the opset-17 patterns TensorRT's parser knows (GroupNorm as InstanceNormalization, one
LayerNormalization per LayerNorm). The dynamo exporter also works here (`ExportOptions(dynamo=True)`, at opset 18,
about 15x slower to export; fused step checked against torch too) and is the fallback once the TorchScript one
is removed.

fp16: the modules are deep copies converted with `.half()`, so the caller's bundle is never modified; see
surgery/precision.py for where fp32 stays. CLIP is exported with its eager attention: the TorchScript exporter's
SDPA symbolic promotes the fp16 attention to float32 around the float causal mask and writes a mistyped graph,
while eager attention is exact and computes its softmax in fp32 explicitly.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from models.bundle import ModelBundle
from models.step import (
    ControlledUNet,
    ControlNetResiduals,
    GuidedDDIMUpdate,
    HintEncoder,
    LatentDecoder,
    TensorSpec,
    TextEncoder,
    network_io,
)
from profiles.config import NUM_CONTROLS, Precision, Profile
from profiles.errors import ControlNetRTError
from surgery.layout import OPSET

FUSED_PARTS = ("controlnet", "unet", "update")
RESIDUAL_NAMES = tuple(f"residual_{i}" for i in range(NUM_CONTROLS))
CONTROL_NAMES = tuple(f"control_{i}" for i in range(NUM_CONTROLS))


# The dynamo exporter's down-conversion to opset 17 writes Split nodes with opset 18's `num_outputs` attribute,
# which onnx.checker rejects (torch 2.13, onnxscript 0.7.2), so it exports at 18, its native opset.
DYNAMO_OPSET = 18


@dataclass(frozen=True)
class ExportOptions:
    dynamo: bool = False  # TorchScript exporter by default: see the module docstring
    opset_override: "int | None" = None  # default: OPSET (TorchScript) or DYNAMO_OPSET

    @property
    def opset(self) -> int:
        if self.opset_override is not None:
            return self.opset_override
        return DYNAMO_OPSET if self.dynamo else OPSET

    @property
    def exporter_name(self) -> str:
        return "dynamo" if self.dynamo else "torchscript"


@dataclass(frozen=True)
class ExportedPart:
    name: str
    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def hint_channels(bundle: ModelBundle) -> int:
    return int(bundle.controlnet.config.block_out_channels[0])


class PartExporter:
    """Exports the parts of one (bundle, profile, precision) into `workdir`, each in its own subfolder (a part over
    2 GB gets external data files named after its tensors, which would collide between ControlNet and UNet)."""

    def __init__(self, bundle: ModelBundle, profile: Profile, precision: Precision, workdir: Path,
                 options: ExportOptions = ExportOptions()):
        self.bundle, self.profile, self.precision = bundle, profile, Precision(precision)
        self.workdir, self.options = Path(workdir), options
        self.dtype = self.precision.torch_dtype
        self.io = network_io(profile, bundle.context_dim, hint_channels(bundle))
        self._generator = torch.Generator().manual_seed(0)

    # --- the parts ------------------------------------------------------------------------------------------------

    def fused_step_parts(self) -> dict[str, ExportedPart]:
        step = self.io["fused_step"]
        b2 = self.profile.cfg_batch
        controlnet = ControlNetResiduals(self._network("controlnet"))
        sample = self._sample(TensorSpec((b2, *step["x"].shape[1:]), self.dtype))
        timesteps = torch.full((b2,), 951.0, device=sample.device)
        context = self._sample(TensorSpec(step["context"].shape, self.dtype))
        hint = self._sample(TensorSpec((b2, *step["hint_features"].shape[1:]), self.dtype))
        names_in = ("sample", "timesteps", "context")
        parts = {"controlnet": self._export("controlnet", controlnet, (sample, timesteps, context, hint),
                                            names_in + ("hint_features",), RESIDUAL_NAMES)}
        with torch.no_grad():
            controls = list(controlnet(sample, timesteps, context, hint))
        del controlnet
        unet = ControlledUNet(self._network("unet"))
        parts["unet"] = self._export("unet", unet, (sample, timesteps, context, controls), names_in + CONTROL_NAMES,
                                     ("eps",))
        with torch.no_grad():
            eps = unet(sample, timesteps, context, controls)
        del unet
        x = self._sample(step["x"])
        scalar = torch.full((1,), 9.0, device=x.device)
        coeffs = torch.rand(4, generator=self._generator).to(x.device)
        parts["update"] = self._export("update", GuidedDDIMUpdate(), (x, eps, scalar, coeffs),
                                       ("x", "eps", "guidance_scale", "coeffs"), ("x_prev",))
        return parts

    def network(self, name: str) -> ExportedPart:
        """One of text_encoder, hint_encoder, vae_decoder, exported with the names of network_io."""
        spec = self.io[name]
        wrappers = {"text_encoder": lambda: TextEncoder(self._text_encoder()),
                    "hint_encoder": lambda: HintEncoder(self._network("controlnet")),
                    "vae_decoder": lambda: LatentDecoder(self._network("vae"))}
        module = wrappers[name]()
        (input_name, input_spec), (output_name, _) = spec.items()
        return self._export(name, module, (self._sample(input_spec),), (input_name,), (output_name,))

    # --- helpers --------------------------------------------------------------------------------------------------

    def _network(self, name: str) -> torch.nn.Module:
        module = getattr(self.bundle, name)
        if self.precision is Precision.FP32 and next(module.parameters()).dtype == torch.float32:
            return module  # read-only use: tracing does not modify the module
        return copy.deepcopy(module).to(self.dtype).eval()

    def _text_encoder(self) -> torch.nn.Module:
        module = copy.deepcopy(self.bundle.text_encoder).to(self.dtype).eval()
        module.set_attn_implementation("eager")
        return module

    def _sample(self, spec: TensorSpec) -> torch.Tensor:
        device = next(self.bundle.unet.parameters()).device
        if spec.dtype == torch.int64:  # token ids: BOS, then EOS padding, like a real empty prompt
            ids = torch.full(spec.shape, 49407, dtype=torch.int64)
            ids[..., 0] = 49406
            return ids.to(device)
        return torch.randn(spec.shape, generator=self._generator).to(device=device, dtype=spec.dtype)

    def _export(self, name: str, module: torch.nn.Module, args: tuple, inputs: Sequence[str],
                outputs: Sequence[str]) -> ExportedPart:
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.onnx"
        exporter = self.options.exporter_name
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # Static shapes: the tracer's "converting a tensor to a Python boolean" warnings are about shape
                # checks that are constant for the profile; the legacy-exporter notice is the choice made above.
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
                warnings.filterwarnings("ignore", message=".*feature will be removed.*")
                torch.onnx.export(module.eval(), args, str(path), input_names=list(inputs),
                                  output_names=list(outputs), opset_version=self.options.opset,
                                  dynamo=self.options.dynamo, do_constant_folding=True)
        except Exception as exc:  # the exporters raise many types; all mean "this torch cannot export this"
            other = "ExportOptions(dynamo=False)" if self.options.dynamo else "ExportOptions(dynamo=True)"
            raise ControlNetRTError(
                f"ONNX export of {name} failed with the {exporter} exporter of torch {torch.__version__}: "
                f"{type(exc).__name__}: {exc}. Try the other exporter ({other}, `--exporter` on the command "
                "line) or a torch version <= 2.14") from exc
        return ExportedPart(name, path, tuple(inputs), tuple(outputs))

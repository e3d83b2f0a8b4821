"""Running TensorRT plans on torch CUDA tensors, capturable into a CUDA graph. Imports tensorrt.

`TrtEngine` owns one execution context and one static torch buffer per I/O tensor, bound once with
`set_tensor_address`; `infer()` only enqueues (`execute_async_v3`) on the caller's current torch stream, with no host
synchronisation, so a loop of steps can be captured with torch.cuda.graph and replayed. torch's streams are enough
for stream interop (`torch.cuda.Stream.cuda_stream` is the raw cudaStream_t TensorRT wants), so cuda-python is not
needed.

Two TensorRT rules shape the code:
- execute_async_v3 on the legacy default stream makes TensorRT add device-wide synchronisations (its docstring says
  so), so when the caller is on the default stream the work forks to a private stream and joins back with events;
- the first enqueue of a context may do one-time setup, which must not happen inside a capture: every engine runs
  once when loaded (NVIDIA's demo/Diffusion also enqueues once before capturing).
Registered memory must not be freed or rewritten before the enqueued work finishes; the buffers live as long as the
engine and all copies into them are ordered on the same stream, which satisfies both.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import tensorrt as trt
import torch

from engines.base import EngineSet
from engines.tensorrt.builder import trt_logger
from engines.tensorrt.dtypes import torch_dtype
from engines.tensorrt.settings import NETWORKS
from models.step import NETWORK_OUTPUTS, STEP_INPUTS, network_io
from profiles.config import Profile
from profiles.errors import ControlNetRTError
from scheduler.ddim import make_ddim_tables


class TrtEngine:
    """One deserialised plan with an execution context and static I/O buffers on `device`."""

    def __init__(self, plan_path: "str | Path", device: "torch.device | str" = "cuda", verbose: bool = False):
        self.path = Path(plan_path)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ControlNetRTError(f"TensorRT runs on CUDA devices only, not {self.device}")
        if not self.path.is_file():
            raise ControlNetRTError(f"plan {self.path} not found: build the plans first (build_tensorrt_plans)")
        with torch.cuda.device(self.device):
            # The runtime must outlive the engine; keep both.
            self.runtime = trt.Runtime(trt_logger(verbose))
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise ControlNetRTError(f"cannot load {self.path}: it was built by another TensorRT version or for "
                                        "another GPU; delete it and rebuild the plans")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise ControlNetRTError(f"cannot create an execution context for {self.path.name}: out of GPU memory?")
            self.tensors: "OrderedDict[str, torch.Tensor]" = OrderedDict()
            self.input_names: list[str] = []
            self.output_names: list[str] = []
            self._bind_buffers()
            self._side_stream = torch.cuda.Stream(self.device)
            self.infer()  # one-time setup outside any capture (see module docstring)
            torch.cuda.current_stream(self.device).synchronize()

    def _static_input_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.engine.get_tensor_shape(name))
        if -1 not in shape:
            return shape
        # An exporter kept a symbolic dim; our builder pinned it with min = opt = max.
        lo, opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
        if lo != hi:
            raise ControlNetRTError(f"{self.path.name}: input {name} has a dynamic range {lo}..{hi}; the plans "
                                    "must be static (rebuild them with build_tensorrt_plans)")
        if not self.context.set_input_shape(name, opt):
            raise ControlNetRTError(f"{self.path.name}: TensorRT rejected shape {opt} for input {name}")
        return opt

    def _bind_buffers(self) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        for name in names:  # inputs first: output shapes may follow from input shapes
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
                self._allocate(name, self._static_input_shape(name))
        for name in names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                self.output_names.append(name)
                shape = tuple(self.context.get_tensor_shape(name))
                if -1 in shape:
                    raise ControlNetRTError(f"{self.path.name}: output {name} has a data-dependent shape {shape}")
                self._allocate(name, shape)

    def _allocate(self, name: str, shape: tuple[int, ...]) -> None:
        # Zeros, not empty: the warm-up run reads the inputs, and garbage token ids would index out of bounds.
        buf = torch.zeros(shape, dtype=torch_dtype(self.engine.get_tensor_dtype(name)), device=self.device)
        if not self.context.set_tensor_address(name, buf.data_ptr()):
            raise ControlNetRTError(f"{self.path.name}: TensorRT rejected the buffer for {name}")
        self.tensors[name] = buf

    def check_io(self, expected: "OrderedDict") -> None:
        """Raise unless the plan's tensors are exactly `expected` (a network_io entry): names, shapes, dtypes."""
        problems = []
        if set(self.tensors) != set(expected):
            problems.append(f"tensors {sorted(self.tensors)} != contract {sorted(expected)}")
        for name, spec in expected.items():
            buf = self.tensors.get(name)
            if buf is not None and (tuple(buf.shape) != tuple(spec.shape) or buf.dtype != spec.dtype):
                problems.append(f"{name}: plan has {tuple(buf.shape)} {buf.dtype}, contract "
                                f"{tuple(spec.shape)} {spec.dtype}")
        if problems:
            raise ControlNetRTError(f"{self.path.name} does not match models.step.network_io ("
                                    + "; ".join(problems) + "): re-export the ONNX and rebuild the plans")

    def infer(self, stream: "torch.cuda.Stream | None" = None) -> None:
        """Enqueue one run on `stream` (default: the current torch stream). Asynchronous; capturable."""
        stream = stream or torch.cuda.current_stream(self.device)
        if stream.cuda_stream != 0:
            self._enqueue(stream.cuda_stream)
            return
        # Legacy default stream: fork to the private stream and join back, device-side only.
        self._side_stream.wait_stream(stream)
        self._enqueue(self._side_stream.cuda_stream)
        stream.wait_stream(self._side_stream)

    def _enqueue(self, handle: int) -> None:
        if not self.context.execute_async_v3(handle):
            raise ControlNetRTError(f"TensorRT failed to enqueue {self.path.name} (see the log above)")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Copy `inputs` (in input order) into the buffers, run, return a copy of the first output.

        For the once-per-image networks: the copy means a later call cannot overwrite what the caller kept.
        """
        if len(inputs) != len(self.input_names):
            raise ControlNetRTError(f"{self.path.name} takes {len(self.input_names)} inputs "
                                    f"({', '.join(self.input_names)}), got {len(inputs)}")
        for name, value in zip(self.input_names, inputs):
            _copy_into(self.tensors[name], value, f"{self.path.name} input {name}")
        self.infer()
        return self.tensors[self.output_names[0]].clone()


def _copy_into(buf: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if tuple(value.shape) != tuple(buf.shape):
        raise ControlNetRTError(f"{what} must be {tuple(buf.shape)} (the profile's static shape), got "
                                f"{tuple(value.shape)}: pick the profile matching this image size / num_samples")
    if value.data_ptr() != buf.data_ptr():
        buf.copy_(value)  # device->device is asynchronous anyway; converts dtype (e.g. fp16 context)


class TensorRTStepRunner:
    """engines.base.StepRunner over the fused-step plan.

    Per-image inputs live in the engine's own bound buffers (prepare() copies into them); per-step t and DDIM
    coefficients are copied on the device from tables indexed by k, so step(x, k) launches only device work and a
    captured loop replays every step with the right constants.
    """

    def __init__(self, engine: TrtEngine, profile: Profile):
        self.engine = engine
        self.device = engine.device
        missing = [n for n in (*STEP_INPUTS, "x_prev") if n not in engine.tensors]
        if missing:
            raise ControlNetRTError(f"{engine.path.name} is not a fused-step plan (missing {missing})")
        tables = make_ddim_tables(profile.ddim_steps).to(self.device)
        buf = engine.tensors
        # The exported step takes t as float32 (1,) (step_io), the tables hold int64: convert once, here.
        self._timesteps = tables.timesteps.to(buf["timestep"].dtype).reshape(-1, 1)
        self._coeffs = tables.coeffs.to(buf["coeffs"].dtype).contiguous()
        self.steps = tables.steps

    def prepare(self, context: torch.Tensor, hint_features: torch.Tensor, guidance_scale: float,
                control_scales: torch.Tensor) -> None:
        buf = self.engine.tensors
        _copy_into(buf["context"], context, "context")
        _copy_into(buf["hint_features"], hint_features, "hint_features")
        _copy_into(buf["control_scales"], control_scales, "control_scales")
        if isinstance(guidance_scale, torch.Tensor):
            _copy_into(buf["guidance_scale"], guidance_scale.reshape(buf["guidance_scale"].shape), "guidance_scale")
        else:
            buf["guidance_scale"].fill_(float(guidance_scale))

    def step(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if not 0 <= k < self.steps:
            raise ControlNetRTError(f"step index {k} outside 0..{self.steps - 1} (the profile has {self.steps} steps)")
        buf = self.engine.tensors
        _copy_into(buf["x"], x, "x")  # skipped when x is already the input buffer
        buf["timestep"].copy_(self._timesteps[k])
        buf["coeffs"].copy_(self._coeffs[k])
        self.engine.infer()
        # The static output buffer: the next step overwrites it (after copying it into x, in stream order).
        return buf["x_prev"]


def load_engines(plans: dict[str, Path], profile: Profile, device) -> dict[str, TrtEngine]:
    """Load the four plans and check each against network_io (dims read from the step plan's own tensors)."""
    engines = {n: TrtEngine(plans[n], device) for n in NETWORKS}
    step = engines["fused_step"].tensors
    if "context" not in step or "hint_features" not in step:
        raise ControlNetRTError(f"{plans['fused_step']} lacks the fused step's context/hint_features inputs")
    io = network_io(profile, int(step["context"].shape[2]), int(step["hint_features"].shape[1]))
    for network, engine in engines.items():
        engine.check_io(io[network])
        if engine.output_names != list(NETWORK_OUTPUTS[network]):
            raise ControlNetRTError(f"{engine.path.name} outputs {engine.output_names}, expected "
                                    f"{list(NETWORK_OUTPUTS[network])}: rebuild the plans")
    return engines


def build_tensorrt_engines(build_dir: "str | Path", profile: Profile, device: "torch.device | str" = "cuda",
                           onnx_dir: "str | Path | None" = None, refit: bool = False,
                           weights_id: "str | None" = None, options=None) -> EngineSet:
    """EngineSet over the plans in `build_dir` (e.g. build/<profile>/tensorrt).

    The plans are built or refreshed from `onnx_dir` (default: the sibling `onnx/` folder) when it has an ONNX
    manifest; without ONNX files, prebuilt plans are used only if their manifest matches this profile, TensorRT
    version and GPU.
    """
    from engines.tensorrt.plans import build_tensorrt_plans, fresh_prebuilt_plans

    build_dir = Path(build_dir)
    device = torch.device(device)
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else build_dir.parent / "onnx"
    if (onnx_dir / "manifest.json").is_file():
        plans = build_tensorrt_plans(onnx_dir, build_dir, profile, refit=refit, options=options, device=device,
                                     weights_id=weights_id)
    else:
        plans = fresh_prebuilt_plans(build_dir, profile, device=device)
    engines = load_engines(plans, profile, device)
    return EngineSet(
        text=engines["text_encoder"],
        hint=engines["hint_encoder"],
        step=TensorRTStepRunner(engines["fused_step"], profile),
        decode=engines["vae_decoder"],
        device=device,
        description=f"TensorRT {trt.__version__} plans ({profile.name}) on {torch.cuda.get_device_name(device)}",
        capturable=True,
    )

"""What the TensorRT builder is asked to do, as plain data: (profile, network, options) -> BuildSettings.

Every choice that changes a plan lives here, in pure functions that tests check without TensorRT; `builder.py`
only translates a BuildSettings onto a trt.IBuilderConfig. The settings also go into the plan manifest's key, so
changing any of them rebuilds the plans.

Choices and why:
- Strongly typed network, always: the fp16 ONNX carries fp16 weights and explicit casts (float32 at the
  boundaries), so precision is decided by the exporter, not by builder flags. TensorRT 10 rejects the FP16 flag on
  a strongly typed network and TensorRT 11 removed it; we never set it.
- Static shapes: one optimisation profile with min = opt = max = the profile's shapes (`models.step.network_io`).
- fp32 profiles are the reference: TF32 is cleared so matmuls/convs stay true fp32 (the torch reference disables
  TF32 too). fp16 profiles allow TF32 for their fp32 islands (norm statistics, softmax), where it costs nothing.
- Refit (optional): BuilderFlag.REFIT keeps the weights replaceable, so a new checkpoint exported to ONNX is
  refit into the plan in seconds instead of rebuilt (`builder.refit_plan`). REFIT_IDENTICAL is not what we want:
  it promises the refit weights equal the build weights. Off by default: TensorRT 11.3's release notes list a
  known issue where REFIT engines can drop a GEMM bias.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.step import NETWORK_OUTPUTS, network_io
from profiles.config import Precision, Profile
from profiles.errors import ControlNetRTError

NETWORKS = ("text_encoder", "hint_encoder", "fused_step", "vae_decoder")
MAX_OPTIMIZATION_LEVEL = 5
TIMING_CACHE_NAME = "timing.cache"
DEFAULT_WORKSPACE = 8 << 30  # bytes; SD1.5 at these sizes needs far less, a cap keeps tactic search from OOM-ing


@dataclass(frozen=True)
class BuildOptions:
    """User-facing knobs (argparse / preprocess.sh fill these); everything else follows from the profile."""

    refit: bool = False
    workspace_bytes: int = DEFAULT_WORKSPACE
    # None: `<plan_dir>/timing.cache`. Point several profiles at one file to share tactic timings across builds.
    timing_cache: "Path | None" = None
    verbose: bool = False


@dataclass(frozen=True)
class BuildSettings:
    """Everything `builder.apply_settings` sets on the builder config, as plain data."""

    network: str
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (name, static shape) in network_io order
    optimization_level: int
    workspace_bytes: int
    set_flags: tuple[str, ...]  # trt.BuilderFlag member names
    clear_flags: tuple[str, ...]
    timing_cache: Path
    strongly_typed: bool = True
    profiling_verbosity: str = "DETAILED"  # trt.ProfilingVerbosity: the layer JSON then has tactics and formats
    verbose: bool = field(default=False, compare=False)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.input_shapes)

    def as_key(self) -> dict:
        """JSON-ready summary for the manifest key (the timing cache path and verbosity do not change a plan)."""
        key = asdict(self)
        for name in ("timing_cache", "verbose"):
            key.pop(name)
        key["input_shapes"] = {name: list(shape) for name, shape in self.input_shapes}
        key["set_flags"], key["clear_flags"] = list(self.set_flags), list(self.clear_flags)
        return key


def precision_flags(precision: Precision) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(flags to set, flags to clear) that follow from the precision alone (see module docstring)."""
    if precision is Precision.FP32:
        return (), ("TF32",)
    return ("TF32",), ()


def timing_cache_path(plan_dir: "str | Path", options: BuildOptions) -> Path:
    return Path(options.timing_cache) if options.timing_cache is not None else Path(plan_dir) / TIMING_CACHE_NAME


def input_shapes(profile: Profile, network: str, context_dim: int, hint_channels: int) -> dict[str, tuple[int, ...]]:
    """The static input shapes of one network, from the shared I/O contract."""
    if network not in NETWORKS:
        raise ControlNetRTError(f"unknown network {network!r}: choose one of {', '.join(NETWORKS)}")
    io = network_io(profile, context_dim, hint_channels)[network]
    return {name: tuple(spec.shape) for name, spec in io.items() if name not in NETWORK_OUTPUTS[network]}


def build_settings(profile: Profile, network: str, context_dim: int, hint_channels: int, plan_dir: "str | Path",
                   options: BuildOptions = BuildOptions()) -> BuildSettings:
    level = profile.trt_optimization_level
    if not 0 <= level <= MAX_OPTIMIZATION_LEVEL:
        raise ControlNetRTError(f"profile {profile.name}: trt_optimization_level must be 0..{MAX_OPTIMIZATION_LEVEL}, "
                                f"got {level} (3 is TensorRT's default, 5 searches longest)")
    if options.workspace_bytes <= 0:
        raise ControlNetRTError(f"workspace_bytes must be positive, got {options.workspace_bytes}")
    set_flags, clear_flags = precision_flags(profile.precision)
    if options.refit:
        set_flags = set_flags + ("REFIT",)
    shapes = input_shapes(profile, network, context_dim, hint_channels)
    return BuildSettings(
        network=network,
        input_shapes=tuple(shapes.items()),
        optimization_level=level,
        workspace_bytes=int(options.workspace_bytes),
        set_flags=set_flags,
        clear_flags=clear_flags,
        timing_cache=timing_cache_path(plan_dir, options),
        verbose=options.verbose,
    )


def plan_path(plan_dir: "str | Path", network: str) -> Path:
    return Path(plan_dir) / f"{network}.plan"


def layer_info_path(plan_dir: "str | Path", network: str) -> Path:
    """The engine inspector's per-layer JSON, written next to the plan (for reading, never for loading)."""
    return Path(plan_dir) / f"{network}.layers.json"

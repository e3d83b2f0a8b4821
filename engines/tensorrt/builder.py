"""ONNX -> TensorRT plan, and refitting a plan with new weights. Imports tensorrt: load it only to build.

Written against the TensorRT 10/11 Python API (checked against the 10.16 and 11.4 bindings' docstrings):
    trt.Builder -> create_network(1 << STRONGLY_TYPED) -> trt.OnnxParser.parse_from_file (resolves external weight
    files relative to the .onnx) -> IBuilderConfig (BuildSettings applied) -> build_serialized_network -> .plan
The timing cache persists between builds (loaded if present, merged result saved atomically), so rebuilding a
profile, or building a sibling profile that shares the cache, skips most tactic timing. The engine inspector's
per-layer JSON is saved next to the plan for reading what TensorRT fused and which tactics it picked.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path

import tensorrt as trt

from artifacts import atomic_file
from engines.tensorrt.settings import BuildSettings
from profiles.errors import ControlNetRTError


@functools.lru_cache(maxsize=None)
def trt_logger(verbose: bool = False) -> "trt.ILogger":
    """One logger per severity for the process (TensorRT objects keep a pointer to theirs)."""
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


if hasattr(trt, "IProgressMonitor"):  # TensorRT >= 10.0

    class PhasePrinter(trt.IProgressMonitor):
        """Prints the builder's phases (nested by parent) with their wall time; never cancels the build.

        TensorRT calls these from its own threads, hence the lock. Only the two outer levels are printed: the inner
        ones are per-tactic and would flood the log.
        """

        MAX_DEPTH = 1

        def __init__(self, label: str, stream=sys.stderr):
            trt.IProgressMonitor.__init__(self)
            self.label = label
            self.stream = stream
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self._started[phase_name] = time.perf_counter()
                if depth <= self.MAX_DEPTH:
                    print(f"[tensorrt {self.label}] {'  ' * depth}{phase_name} ({num_steps} steps)",
                          file=self.stream, flush=True)

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            with self._lock:
                depth = self._depth.pop(phase_name, 0)
                seconds = time.perf_counter() - self._started.pop(phase_name, time.perf_counter())
                if depth <= self.MAX_DEPTH:
                    print(f"[tensorrt {self.label}] {'  ' * depth}{phase_name} done in {seconds:.1f} s",
                          file=self.stream, flush=True)

else:  # pragma: no cover - TensorRT 8.x has no progress interface; build_plan logs start/end lines instead
    PhasePrinter = None


def _parser_errors(parser) -> str:
    """Every error a parser (or parser refitter) recorded, one per line, with the ONNX node it came from."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node {err.node()}"
        for attr in ("node_name", "node_operator"):  # TensorRT >= 8.6
            if hasattr(err, attr) and getattr(err, attr)():
                where += f" {getattr(err, attr)()}"
        lines.append(f"  {err.code()}: {err.desc()} ({where})")
    return "\n".join(lines) or "  (the parser recorded no details; rerun with verbose=True)"


def parse_onnx(builder, onnx_path: Path, logger, strongly_typed: bool = True):
    """(network, parser): the parser must outlive the network's use, as it owns the weights memory."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ControlNetRTError(f"TensorRT cannot parse {onnx_path}:\n{_parser_errors(parser)}\n"
                                "Fix the export (surgery) or update TensorRT, then rebuild")
    return network, parser


def _set_flag(config, name: str, on: bool) -> None:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        if on:
            raise ControlNetRTError(f"TensorRT {trt.__version__} has no builder flag {name}: update TensorRT")
        return  # a flag this version lacks is already "cleared"
    (config.set_flag if on else config.clear_flag)(flag)


def add_static_profile(builder, network, config, settings: BuildSettings) -> None:
    """Check the parsed inputs against the contract and pin any dynamic dimension to min = opt = max.

    A fully static network needs no optimisation profile; one with a symbolic dimension (an exporter that kept
    a dynamic batch) gets exactly the profile's shapes, so the engine is static either way.
    """
    want = settings.shapes
    got = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if set(got) != set(want):
        raise ControlNetRTError(f"{settings.network}: ONNX inputs {sorted(got)} != contract {sorted(want)}: re-export")
    opt_profile = None
    for name, dims in got.items():
        shape = want[name]
        if len(dims) != len(shape) or any(d not in (-1, s) for d, s in zip(dims, shape)):
            raise ControlNetRTError(f"{settings.network}: input {name} is {dims}, the profile needs {shape}: "
                                    "re-export the ONNX for this profile")
        if -1 in dims:
            opt_profile = opt_profile or builder.create_optimization_profile()
            opt_profile.set_shape(name, shape, shape, shape)
    if opt_profile is not None:
        config.add_optimization_profile(opt_profile)


def apply_settings(builder, network, config, settings: BuildSettings):
    """Translate BuildSettings onto `config`. Returns the progress monitor, which must outlive the build."""
    add_static_profile(builder, network, config, settings)
    config.builder_optimization_level = settings.optimization_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    for name in settings.set_flags:
        _set_flag(config, name, True)
    for name in settings.clear_flags:
        _set_flag(config, name, False)
    config.profiling_verbosity = getattr(trt.ProfilingVerbosity, settings.profiling_verbosity)
    monitor = PhasePrinter(settings.network) if PhasePrinter is not None else None
    if monitor is not None:
        config.progress_monitor = monitor
    return monitor


def load_timing_cache(config, path: Path):
    """Attach the cache at `path` (or a fresh one). A cache from another GPU or TensorRT version fails
    verification; it is then replaced by a fresh one rather than failing the build."""
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, False):
            return cache
    except (RuntimeError, TypeError, ValueError):  # a truncated or foreign file
        pass
    print(f"[tensorrt] timing cache {path} does not fit this GPU / TensorRT; starting a fresh one", file=sys.stderr)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return cache


def save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(cache.serialize())


def write_layer_info(plan, path: Path, logger) -> None:
    """The inspector's JSON (layers, tactics, formats: DETAILED verbosity) next to the plan."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ControlNetRTError(f"TensorRT could not load the plan it just built for {path.name}")
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    with atomic_file(path) as tmp:
        tmp.write_text(info)


def build_plan(onnx_path: "str | Path", plan_path: "str | Path", settings: BuildSettings,
               layer_info: "str | Path | None" = None) -> Path:
    """Build one plan from one ONNX file with `settings`; writes the plan (and layer JSON) atomically."""
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    logger = trt_logger(settings.verbose)
    builder = trt.Builder(logger)
    network, parser = parse_onnx(builder, onnx_path, logger, settings.strongly_typed)
    config = builder.create_builder_config()
    monitor = apply_settings(builder, network, config, settings)
    load_timing_cache(config, settings.timing_cache)
    print(f"[tensorrt] building {plan_path.name} from {onnx_path.name} (TensorRT {trt.__version__}, "
          f"level {settings.optimization_level}, flags +{list(settings.set_flags)} -{list(settings.clear_flags)})",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ControlNetRTError(f"TensorRT failed to build {plan_path.name} from {onnx_path} (see the log above); "
                                "try a larger workspace or a lower optimisation level")
    print(f"[tensorrt] built {plan_path.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    save_timing_cache(config, settings.timing_cache)
    # IHostMemory exposes the buffer protocol: written and re-read without a copy (plans run to gigabytes).
    with atomic_file(plan_path) as tmp, open(tmp, "wb") as f:
        f.write(serialized)
    if layer_info is not None:
        write_layer_info(serialized, Path(layer_info), logger)
    del monitor, parser  # kept alive until here on purpose: TensorRT holds raw pointers to both during the build
    return plan_path


def refit_plan(plan_path: "str | Path", onnx_with_new_weights: "str | Path",
               out_path: "str | Path | None" = None, verbose: bool = False) -> Path:
    """Replace a refittable plan's weights with those of an ONNX file of the same graph (a new checkpoint
    exported by the same surgery). Writes `out_path` (default: over the plan) atomically; no rebuild."""
    plan_path, onnx_path = Path(plan_path), Path(onnx_with_new_weights)
    out_path = Path(out_path) if out_path is not None else plan_path
    logger = trt_logger(verbose)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise ControlNetRTError(f"cannot load {plan_path}: built by another TensorRT version or GPU; rebuild it")
    if not engine.refittable:
        raise ControlNetRTError(f"{plan_path} was built without refit: rebuild it with refit=True to swap weights")
    refitter = trt.Refitter(engine, logger)
    onnx_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not onnx_refitter.refit_from_file(str(onnx_path)):
        raise ControlNetRTError(f"cannot take weights from {onnx_path} for {plan_path.name}:\n"
                                f"{_parser_errors(onnx_refitter)}\nThe ONNX graph must be the one the plan was built from")
    if not refitter.refit_cuda_engine():
        missing = list(refitter.get_missing_weights())
        raise ControlNetRTError(f"refit of {plan_path.name} failed; weights still missing: {missing[:10]}"
                                f"{' ...' if len(missing) > 10 else ''}. Rebuild the plan instead")
    serialized = engine.serialize()
    with atomic_file(out_path) as tmp, open(tmp, "wb") as f:
        f.write(serialized)
    return out_path

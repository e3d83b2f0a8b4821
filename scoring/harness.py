"""The score run: time the candidate through the hackathon interface, then score it against the fp32 reference.

Like the hackathon's compute_score.py (design.md part 2 (b)): initialize() outside timing, then one process()
call per image with the fixed arguments, wall-clock time per call, the first call excluded as warm-up, results
written with cv2.imwrite semantics (JPEG, quality 95). Then a second hackathon instance, the fp32 profile of the
same shapes on the torch backend (the reference path), runs the same images; the candidate is released first so
the reference never shares the device with the timed run. PSNR and absolute errors compare the uint8 arrays;
PD compares the two JPEG files, as the hackathon does.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from profiles.config import Backend, reference_of
from profiles.errors import ControlNetRTError
from scoring.config import ScoreConfig
from scoring.environment import describe_environment
from scoring.grid import GridRow, build_grid
from scoring.images import InputImage, encode_jpeg, encode_png, load_test_images, write_bytes_atomic
from scoring.metrics import compare, summarize_latency
from scoring.pd import PD_THRESHOLD, PDScorer, PDUnavailable, load_pd_scorer
from scoring.report import REPORT_NAME, ImageRow, ScoreReport, summarize_fidelity

GRID_NAME = "grid.png"
REFERENCE_DIR = "reference"


class Hackathon(Protocol):
    def initialize(self, **kwargs) -> None: ...

    def process(self, input_image, *args) -> list: ...


HackathonFactory = Callable[[], Hackathon]


def default_factory() -> Hackathon:
    try:
        from canny2image_TRT import hackathon
    except ImportError as exc:
        raise ControlNetRTError(f"cannot import canny2image_TRT ({exc}): run compute_score.py from the repository "
                                "root") from exc
    return hackathon()


@dataclass
class RunOutput:
    """What one hackathon instance produced over the images."""

    description: str
    weights_id: "str | None"
    init_s: float
    results: list[list[np.ndarray]] = field(default_factory=list)  # per image: num_samples (H, W, 3) RGB uint8
    latencies_ms: list[float] = field(default_factory=list)
    stage_ms: list["dict | None"] = field(default_factory=list)
    edges: list["np.ndarray | None"] = field(default_factory=list)


def _runtime_attr(hk, name: str):
    return getattr(getattr(hk, "runtime", None), name, None)


def _check_output(output, name: str, num_samples: int, shape: tuple) -> list[np.ndarray]:
    ok = isinstance(output, (list, tuple)) and len(output) == num_samples and all(
        isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == shape for a in output)
    if not ok:
        got = type(output).__name__
        if isinstance(output, (list, tuple)):
            got += f" of {[(getattr(a, 'shape', None), str(getattr(a, 'dtype', None))) for a in output]}"
        raise ControlNetRTError(f"process() on {name} returned {got}: the hackathon interface must return a list of "
                                f"{num_samples} uint8 arrays of shape {shape}")
    return list(output)


def run_instance(factory: HackathonFactory, init_kwargs: dict, images: list[InputImage], config: ScoreConfig,
                 label: str, log: Callable[[str], None], trace_path: "Path | None" = None) -> RunOutput:
    """initialize() once (untimed), then one timed process() call per image; optionally one traced call after."""
    log(f"[{label}] initialize({', '.join(f'{k}={v!r}' for k, v in init_kwargs.items())})")
    start = time.perf_counter()
    hk = factory()
    hk.initialize(**init_kwargs)
    init_s = time.perf_counter() - start
    description = _runtime_attr(hk, "description") or str(init_kwargs)
    bundle = _runtime_attr(hk, "bundle")
    run = RunOutput(description=str(description), weights_id=getattr(bundle, "weights_id", None), init_s=init_s)
    log(f"[{label}] ready in {init_s:.1f} s: {run.description}")
    args = config.process.positional()
    shape = config.profile.image_shape
    for i, image in enumerate(images):
        start = time.perf_counter()
        output = hk.process(image.bgr, *args)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        run.results.append(_check_output(output, image.name, config.process.num_samples, shape))
        run.latencies_ms.append(elapsed_ms)
        timings = _runtime_attr(hk, "timings")
        run.stage_ms.append({k: float(v) for k, v in timings.items()} if isinstance(timings, dict) else None)
        hint_map = _runtime_attr(hk, "last_hint_map")
        run.edges.append(np.array(hint_map) if i < config.grid_rows and hint_map is not None else None)
        log(f"[{label}] {image.name}: {elapsed_ms:.1f} ms{' (warm-up)' if i == 0 else ''}")
    if trace_path is not None:
        from scoring.trace import write_trace

        write_trace(lambda: hk.process(images[0].bgr, *args), trace_path, config.device)
        log(f"[{label}] trace of one process() call written to {trace_path}")
    hk = None  # drop the only reference so the networks are freed before the next instance loads
    gc.collect()
    if config.on_gpu:
        import torch

        torch.cuda.empty_cache()
    return run


def _write_results(out: Path, images: list[InputImage], results: list[list[np.ndarray]]) -> list[str]:
    """cv2.imwrite semantics of the original (RGB arrays written as if BGR, JPEG quality 95); atomic."""
    files = []
    for image, samples in zip(images, results):
        for j, sample in enumerate(samples):
            path = out / (f"{image.name}.jpg" if j == 0 else f"{image.name}_{j}.jpg")
            write_bytes_atomic(path, encode_jpeg(sample))
            if j == 0:
                files.append(str(path))
    return files


def _edges_for_grid(image: InputImage, recorded: "np.ndarray | None", config: ScoreConfig) -> np.ndarray:
    if recorded is not None:
        return recorded
    import cv2

    return cv2.Canny(image.bgr, config.process.low_threshold, config.process.high_threshold)


def _caption(row: ImageRow) -> str:
    parts = [row.name, f"{row.latency_ms:.1f} ms" + (" (warm-up)" if row.warmup else "")]
    if row.psnr_db is not None:
        parts.append(f"PSNR {row.psnr_db:.2f} dB" if np.isfinite(row.psnr_db) else "identical")
        parts.append(f"max err {row.max_abs_error}")
    if row.pd is not None:
        parts.append(f"PD {row.pd:.3f}")
    return "   ".join(parts)


def _settings(config: ScoreConfig, images: list[InputImage]) -> dict:
    return {
        "process_args": asdict(config.process),
        "num_images": len(images),
        "images": str(config.images) if config.images else f"generated from skimage.data under {config.image_cache}",
        "image_sources": [image.source for image in images],
        "out": str(config.out),
        "device": config.device,
        "reference": config.reference,
        "inception_weights": str(config.inception_weights) if config.inception_weights else None,
        "trace": str(config.trace) if config.trace else None,
        "warmup_calls_excluded": 1,
        "timer": "time.perf_counter around process() (wall clock; the result is a host array, so the device is done)",
    }


def _score_rows(rows: list[ImageRow], candidate: RunOutput, reference: RunOutput, reference_files: list[str],
                pd_scorer: "PDScorer | PDUnavailable") -> None:
    """Fill each row's fidelity columns: errors on the uint8 arrays (all samples), PD on the sample-0 JPEGs."""
    for row, ref_samples, ref_file in zip(rows, reference.results, reference_files):
        fid = compare(np.stack(candidate.results[row.index]), np.stack(ref_samples))
        row.reference_latency_ms = reference.latencies_ms[row.index]
        row.reference_file = ref_file
        row.psnr_db, row.mse = fid.psnr_db, fid.mse
        row.max_abs_error, row.mean_abs_error = fid.max_abs_error, fid.mean_abs_error
        if isinstance(pd_scorer, PDScorer):
            row.pd = pd_scorer.distance(row.result_file, ref_file)


def _write_grid(config: ScoreConfig, images: list[InputImage], rows: list[ImageRow], candidate: RunOutput,
                reference: "RunOutput | None") -> None:
    grid_rows = [GridRow(input_bgr=images[i].bgr, edges=_edges_for_grid(images[i], candidate.edges[i], config),
                         result_rgb=candidate.results[i][0],
                         reference_rgb=reference.results[i][0] if reference else None, caption=_caption(rows[i]))
                 for i in range(min(config.grid_rows, len(images)))]
    write_bytes_atomic(config.out / GRID_NAME, encode_png(build_grid(grid_rows)))


def run_score(config: ScoreConfig, factory: HackathonFactory = default_factory,
              log: Callable[[str], None] = print) -> ScoreReport:
    """The whole score; writes images, grid and report.json under config.out and returns the report."""
    p = config.profile
    images = load_test_images(config.num_images, folder=config.images, cache_root=config.image_cache,
                              height=p.height, width=p.width, exact=config.num_images_exact)
    notes = list(config.notes)
    # Loaded before any timing, as the original builds its Inception at import: a bad weights file fails fast.
    if config.reference:
        pd_scorer = load_pd_scorer(config.inception_weights, config.device)
    else:
        pd_scorer = PDUnavailable("--no-reference: there is no fp32 reference image to compare with")
    if isinstance(pd_scorer, PDScorer):
        notes += pd_scorer.notes
    environment = describe_environment(config.device)

    init_kwargs = dict(weights=config.weights, profile=config.profile_arg, backend=config.backend.value,
                       device=config.device)
    candidate = run_instance(factory, init_kwargs, images, config, "candidate", log, config.trace)
    result_files = _write_results(config.out, images, candidate.results)
    rows = [ImageRow(index=i, name=image.name, source=image.source, latency_ms=candidate.latencies_ms[i],
                     warmup=(i == 0), result_file=result_files[i], stage_ms=candidate.stage_ms[i])
            for i, image in enumerate(images)]

    reference, reference_info = None, None
    if config.reference:
        ref_kwargs = dict(weights=config.weights, profile=config.reference_profile, backend=Backend.TORCH.value,
                          device=config.device)
        reference = run_instance(factory, ref_kwargs, images, config, "reference", log)
        reference_files = _write_results(config.out / REFERENCE_DIR, images, reference.results)
        reference_info = {"profile": reference_of(p).name, "backend": Backend.TORCH.value,
                          "runtime": reference.description}
        if reference.description == candidate.description:
            notes.append("the candidate runs the same path as the fp32 reference: fidelity measures run-to-run "
                         "determinism")
        _score_rows(rows, candidate, reference, reference_files, pd_scorer)

    fidelity = summarize_fidelity(
        rows, status="ok" if config.reference else "not measured (--no-reference)",
        pd_status="ok" if isinstance(pd_scorer, PDScorer) else pd_scorer.message, pd_threshold=PD_THRESHOLD)
    _write_grid(config, images, rows, candidate, reference)

    weights_id = candidate.weights_id
    if weights_id is None:
        from models import resolve_weights_id

        weights_id = resolve_weights_id(config.weights)
    report = ScoreReport(
        settings=_settings(config, images), environment=environment, weights=config.weights, weights_id=weights_id,
        backend=config.backend.value, profile=p.name, runtime=candidate.description, rows=rows,
        latency=summarize_latency(candidate.latencies_ms[1:]), fidelity=fidelity, reference=reference_info,
        reference_latency=summarize_latency(reference.latencies_ms[1:]) if reference else None,
        init_s={"candidate": candidate.init_s, **({"reference": reference.init_s} if reference else {})},
        notes=notes)
    report.save(config.out / REPORT_NAME)
    return report

"""The score report: typed rows and summaries, their JSON form and the text table compute_score.py prints.

JSON has no infinity, and PSNR of identical images is infinite, so non-finite floats are written as the strings
"inf", "-inf" and "nan" and read back as floats; everything else is plain JSON. The report is written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from artifacts import atomic_file
from scoring.metrics import LatencySummary, psnr_from_mse

REPORT_VERSION = 1
REPORT_NAME = "report.json"
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


@dataclass
class ImageRow:
    index: int
    name: str
    source: str
    latency_ms: float
    warmup: bool  # the first call, excluded from the latency summary as in the hackathon's script
    result_file: str
    stage_ms: "dict[str, float] | None" = None  # the runtime's per-stage times of this call, when it exposes them
    reference_latency_ms: "float | None" = None
    reference_file: "str | None" = None
    psnr_db: "float | None" = None
    mse: "float | None" = None
    max_abs_error: "int | None" = None
    mean_abs_error: "float | None" = None
    pd: "float | None" = None


@dataclass
class FidelitySummary:
    status: str  # "ok", or why there is no reference
    pd_status: str  # "ok", or "PD unavailable: <reason>"
    pd_threshold: float
    psnr_db_min: "float | None" = None
    psnr_db_pooled: "float | None" = None  # from the mean MSE over all images: finite unless all are identical
    max_abs_error: "int | None" = None
    mean_abs_error: "float | None" = None
    pd_mean: "float | None" = None
    pd_max: "float | None" = None
    pd_pass: "bool | None" = None  # every image's PD <= threshold


def summarize_fidelity(rows: list[ImageRow], status: str, pd_status: str, pd_threshold: float) -> FidelitySummary:
    summary = FidelitySummary(status=status, pd_status=pd_status, pd_threshold=pd_threshold)
    compared = [r for r in rows if r.mse is not None]
    if compared:
        summary.psnr_db_min = min(r.psnr_db for r in compared)
        summary.psnr_db_pooled = psnr_from_mse(sum(r.mse for r in compared) / len(compared))
        summary.max_abs_error = max(r.max_abs_error for r in compared)
        summary.mean_abs_error = sum(r.mean_abs_error for r in compared) / len(compared)
    scored = [r.pd for r in rows if r.pd is not None]
    if scored:
        summary.pd_mean = sum(scored) / len(scored)
        summary.pd_max = max(scored)
        summary.pd_pass = summary.pd_max <= pd_threshold
    return summary


@dataclass
class ScoreReport:
    settings: dict
    environment: dict
    weights: str
    weights_id: str
    backend: str
    profile: str
    runtime: str  # the runtime's own description (backend actually used, graphs on/off ...)
    rows: list[ImageRow]
    latency: LatencySummary
    fidelity: FidelitySummary
    reference: "dict | None" = None  # profile, backend and runtime description of the fp32 reference
    reference_latency: "LatencySummary | None" = None
    init_s: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    version: int = REPORT_VERSION

    def to_json(self) -> str:
        return json.dumps(_encode(asdict(self)), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ScoreReport":
        raw = _decode(json.loads(text))
        raw["rows"] = [ImageRow(**row) for row in raw["rows"]]
        raw["latency"] = LatencySummary(**raw["latency"])
        raw["fidelity"] = FidelitySummary(**raw["fidelity"])
        if raw.get("reference_latency") is not None:
            raw["reference_latency"] = LatencySummary(**raw["reference_latency"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def save(self, path: "str | Path") -> Path:
        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: "str | Path") -> "ScoreReport":
        return cls.from_json(Path(path).read_text())


def _encode(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def format_table(report: ScoreReport) -> str:
    """The per-image table and the summary lines, as compute_score.py prints them."""
    env = report.environment
    lines = [f"profile {report.profile}  backend {report.backend}  weights {report.weights} ({report.weights_id})",
             f"device {env.get('device')}  {env.get('gpu_name') or env.get('cpu') or ''}".rstrip(),
             f"runtime: {report.runtime}"]
    if report.reference:
        lines.append(f"reference: {report.reference.get('runtime') or report.reference.get('profile')}")
    header = f"{'image':<10} {'latency ms':>11} {'ref ms':>9} {'PSNR dB':>8} {'max|err|':>8} {'mean|err|':>9} {'PD':>7}"
    lines += ["", header, "-" * len(header)]
    for row in report.rows:
        latency = _fmt(row.latency_ms, ".1f") + ("*" if row.warmup else "")
        lines.append(f"{row.name:<10} {latency:>11} {_fmt(row.reference_latency_ms, '.1f'):>9} "
                     f"{_fmt(row.psnr_db, '.2f'):>8} {_fmt(row.max_abs_error, 'd'):>8} "
                     f"{_fmt(row.mean_abs_error, '.3f'):>9} {_fmt(row.pd, '.3f'):>7}")
    lines.append("(* warm-up call, excluded from the latency summary)")
    lat = report.latency
    lines += ["", f"latency over {lat.count} calls: mean {_fmt(lat.mean_ms, '.2f')} ms, median "
                  f"{_fmt(lat.median_ms, '.2f')} ms, p90 {_fmt(lat.p90_ms, '.2f')} ms"]
    ref = report.reference_latency
    if ref is not None and ref.mean_ms and lat.mean_ms:
        lines.append(f"fp32 reference: mean {ref.mean_ms:.2f} ms (speed-up x{ref.mean_ms / lat.mean_ms:.2f})")
    fid = report.fidelity
    if fid.status == "ok":
        lines.append(f"fidelity vs fp32 reference: PSNR min {_fmt(fid.psnr_db_min, '.2f')} dB, pooled "
                     f"{_fmt(fid.psnr_db_pooled, '.2f')} dB, max|err| {_fmt(fid.max_abs_error, 'd')}, "
                     f"mean|err| {_fmt(fid.mean_abs_error, '.3f')}")
    else:
        lines.append(f"fidelity: {fid.status}")
    if fid.pd_status == "ok":
        verdict = "PASS" if fid.pd_pass else "FAIL"
        lines.append(f"PD: mean {fid.pd_mean:.3f}, max {fid.pd_max:.3f} (threshold {fid.pd_threshold:g} per image: "
                     f"{verdict})")
    else:
        lines.append(fid.pd_status)
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)

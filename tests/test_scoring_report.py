"""The JSON report: strict JSON with infinite PSNR, lossless round trip, atomic write, the printed table."""

import json
import math

import pytest

from scoring.metrics import summarize_latency
from scoring.report import REPORT_NAME, FidelitySummary, ImageRow, ScoreReport, format_table, summarize_fidelity


def _report(**overrides):
    rows = [ImageRow(index=0, name="bird_0", source="skimage.data.astronaut", latency_ms=120.5, warmup=True,
                     result_file="out/bird_0.jpg", stage_ms={"denoise": 80.25, "decode": 10.0},
                     reference_latency_ms=400.0, reference_file="out/reference/bird_0.jpg", psnr_db=math.inf,
                     mse=0.0, max_abs_error=0, mean_abs_error=0.0, pd=0.0),
            ImageRow(index=1, name="bird_1", source="skimage.data.chelsea", latency_ms=100.25, warmup=False,
                     result_file="out/bird_1.jpg", psnr_db=41.5, mse=4.6, max_abs_error=7, mean_abs_error=0.4,
                     pd=3.25)]
    fields = dict(settings={"process_args": {"prompt": "a bird", "seed": 2946901}, "num_images": 2},
                  environment={"device": "cpu", "gpu_name": None, "cpu": "test cpu"},
                  weights="synthetic-tiny", weights_id="synthetic-abc", backend="auto", profile="256x384-fp32",
                  runtime="torch eager fp32 on cpu", rows=rows, latency=summarize_latency([100.25]),
                  fidelity=summarize_fidelity(rows, "ok", "ok", 12.0),
                  reference={"profile": "256x384-fp32", "backend": "torch", "runtime": "torch eager fp32"},
                  reference_latency=summarize_latency([400.0]), init_s={"candidate": 1.5}, notes=["a note"])
    fields.update(overrides)
    return ScoreReport(**fields)


def _strict(text):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=reject)


def test_json_is_strict_and_round_trips_infinity(tmp_path):
    report = _report()
    raw = _strict(report.to_json())
    assert raw["rows"][0]["psnr_db"] == "inf"
    assert raw["fidelity"]["psnr_db_pooled"] == pytest.approx(10 * math.log10(255 ** 2 / 2.3))
    path = report.save(tmp_path / REPORT_NAME)
    back = ScoreReport.load(path)
    assert back == report
    assert back.rows[0].psnr_db == math.inf and isinstance(back.fidelity, FidelitySummary)


def test_all_identical_images_keep_infinite_summary(tmp_path):
    rows = _report().rows[:1]
    report = _report(rows=rows, fidelity=summarize_fidelity(rows, "ok", "ok", 12.0))
    back = ScoreReport.from_json(report.to_json())
    assert back.fidelity.psnr_db_min == math.inf and back.fidelity.psnr_db_pooled == math.inf


def test_save_is_atomic(tmp_path):
    path = tmp_path / REPORT_NAME
    _report().save(path)
    before = path.read_bytes()
    broken = _report(settings={"unserialisable": {1, 2}})
    with pytest.raises(TypeError):
        broken.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_NAME]  # no partial files left behind


def test_table_lists_rows_and_summaries():
    text = format_table(_report())
    lines = text.splitlines()
    assert any(line.startswith("bird_0") and "120.5*" in line and "inf" in line for line in lines)
    assert any(line.startswith("bird_1") and "41.50" in line and "3.250" in line for line in lines)
    assert "latency over 1 calls: mean 100.25 ms" in text
    assert "PD: mean 1.625, max 3.250 (threshold 12 per image: PASS)" in text
    assert "note: a note" in text
    unavailable = _report(fidelity=summarize_fidelity(_report().rows, "ok", "PD unavailable: no weights", 12.0))
    assert "PD unavailable: no weights" in format_table(unavailable)

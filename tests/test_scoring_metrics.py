"""Fidelity and latency numbers of the score harness, on hand-computed values."""

import math

import numpy as np
import pytest

from scoring.metrics import compare, max_abs_error, mean_abs_error, psnr, summarize_latency
from scoring.report import ImageRow, summarize_fidelity


def test_psnr_identical_is_inf():
    image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    assert psnr(image, image.copy()) == math.inf
    assert max_abs_error(image, image) == 0


def test_psnr_known_values():
    a = np.full((4, 6, 3), 100, np.uint8)
    # MSE 1 -> 20*log10(255) = 48.1308 dB; MSE 100 -> 28.1308 dB.
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)
    assert psnr(a, a + 10) == pytest.approx(48.130803608679 - 20, abs=1e-9)
    # Max error 255 over 1 of 4 pixels: MSE 255^2/4 -> 10*log10(4) = 6.0206 dB.
    b = np.zeros((2, 2), np.uint8)
    c = b.copy()
    c[0, 0] = 255
    assert psnr(b, c) == pytest.approx(10 * math.log10(4), abs=1e-9)


def test_errors_do_not_wrap_around_in_uint8():
    a = np.array([[0, 255]], np.uint8)
    b = np.array([[255, 0]], np.uint8)
    assert max_abs_error(a, b) == 255
    assert mean_abs_error(a, b) == 255.0
    fid = compare(a, b)
    assert fid.mse == 255.0 ** 2 and fid.psnr_db == pytest.approx(0.0, abs=1e-12)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        psnr(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))


def test_latency_summary():
    s = summarize_latency([float(v) for v in range(1, 11)])
    assert s.count == 10
    assert s.mean_ms == pytest.approx(5.5) and s.median_ms == pytest.approx(5.5)
    assert s.p90_ms == pytest.approx(9.1)  # numpy linear interpolation
    assert (s.min_ms, s.max_ms) == (1.0, 10.0)
    empty = summarize_latency([])
    assert empty.count == 0 and empty.mean_ms is None and empty.p90_ms is None


def psnr_from(mse):
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def _row(i, mse, max_err, pd=None):
    return ImageRow(index=i, name=f"bird_{i}", source="s", latency_ms=1.0, warmup=i == 0, result_file="f",
                    psnr_db=psnr_from(mse), mse=mse, max_abs_error=max_err, mean_abs_error=mse ** 0.5, pd=pd)


def test_fidelity_summary_pools_mse_so_identical_images_stay_finite():
    rows = [_row(0, 0.0, 0, pd=1.0), _row(1, 2.0, 3, pd=13.0)]
    s = summarize_fidelity(rows, "ok", "ok", 12.0)
    assert s.psnr_db_min == pytest.approx(psnr_from(2.0))
    assert s.psnr_db_pooled == pytest.approx(psnr_from(1.0))  # mean MSE 1.0
    assert s.max_abs_error == 3
    assert s.pd_mean == pytest.approx(7.0) and s.pd_max == 13.0 and s.pd_pass is False
    assert summarize_fidelity([_row(0, 0.0, 0)], "ok", "x", 12.0).psnr_db_pooled == math.inf

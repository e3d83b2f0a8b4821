"""build_onnx as a cached build step: reuse when nothing changed, targeted rebuilds, no trace of failed builds,
external data files, and the `python3 -m surgery` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from artifacts.manifest import Manifest
from profiles import ControlNetRTError, Precision, get_profile
from surgery import NETWORKS, build_onnx, manifest_key
from surgery.export import ExportOptions
from tests.surgery_fixtures import TINY, build, session_root, small_profile

REPO = Path(__file__).resolve().parent.parent


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def test_rebuild_only_what_changed_with_external_data(tmp_path, bundle, capfd):
    profile = small_profile(Precision.FP32)
    out = tmp_path / "onnx"
    # threshold 0: every network keeps its weights in <name>.onnx.data, as the real 2.4-4.8 GB fused step does.
    paths = build_onnx(bundle, profile, out, external_data_threshold=0)
    assert set(paths) == set(NETWORKS)
    manifest = Manifest.load(out)
    assert set(manifest.artifacts) == set(NETWORKS) | {f"{n}.data" for n in NETWORKS}
    assert manifest.key == manifest_key(profile, bundle.weights_id, Precision.FP32)
    assert all((out / f"{n}.onnx.data").is_file() for n in NETWORKS)
    # onnxruntime finds the side file next to the graph and computes the same step as a self-contained build.
    sess = ort.InferenceSession(str(paths["fused_step"]), providers=["CPUExecutionProvider"])
    feed = {i.name: np.full([d for d in i.shape], 0.5, np.float32) for i in sess.get_inputs()}
    (x_prev,) = sess.run(None, feed)
    assert np.isfinite(x_prev).all()
    capfd.readouterr()

    before = mtimes(out)
    assert build_onnx(bundle, profile, out, external_data_threshold=0) == paths
    assert "reusing" in capfd.readouterr().err
    assert mtimes(out) == before

    # A corrupted side file: only that network is rebuilt.
    with open(out / "vae_decoder.onnx.data", "ab") as f:
        f.write(b"\0")
    build_onnx(bundle, profile, out, external_data_threshold=0)
    err = capfd.readouterr().err
    assert "[onnx] building vae_decoder for" in err and "export controlnet" not in err
    after = mtimes(out)
    assert after["fused_step.onnx"] == before["fused_step.onnx"]
    assert after["vae_decoder.onnx.data"] != before["vae_decoder.onnx.data"]
    assert Manifest.load(out).is_fresh(out, manifest.key, list(Manifest.load(out).artifacts))

    # The state a kill between build_onnx's two renames leaves: record dropped, new bytes, staging leftovers.
    manifest = Manifest.load(out)
    del manifest.artifacts["hint_encoder"], manifest.artifacts["hint_encoder.data"]
    manifest.save(out)
    (out / "hint_encoder.onnx").write_bytes(b"partial")
    (out / ".staging-hint_encoder.x").mkdir()
    (out / ".staging-hint_encoder.x" / "hint_encoder.onnx").write_bytes(b"partial")
    build_onnx(bundle, profile, out, external_data_threshold=0)
    err = capfd.readouterr().err
    assert "[onnx] building hint_encoder for" in err and "export controlnet" not in err
    assert not any(p.name.startswith(".staging") for p in out.iterdir())
    ort.InferenceSession(str(out / "hint_encoder.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.filterwarnings("ignore:Exporting to ONNX opset version 999")
def test_failed_build_leaves_nothing_usable(tmp_path, bundle):
    out = tmp_path / "onnx"
    with pytest.raises(ControlNetRTError, match="ONNX export of text_encoder failed"):
        build_onnx(bundle, small_profile(), out, options=ExportOptions(opset_override=999))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert Manifest.load(out).artifacts == {}


def test_key_covers_profile_precision_weights_and_exporter(bundle):
    base = manifest_key(small_profile(), bundle.weights_id, Precision.FP32)
    assert base != manifest_key(small_profile(), bundle.weights_id, Precision.FP16)
    assert base != manifest_key(small_profile(num_samples=2), bundle.weights_id, Precision.FP32)
    assert base != manifest_key(small_profile(), "other-weights", Precision.FP32)
    assert base != manifest_key(small_profile(), bundle.weights_id, Precision.FP32, exporter="dynamo")
    assert set(base["libraries"]) >= {"torch", "onnx", "onnx-graphsurgeon"}
    json.dumps(base)  # stored as JSON


def test_command_line_reuses_a_finished_build(tmp_path_factory, bundle):
    # The full-size tiny build the onnxruntime end-to-end test uses too (shared through build_onnx's cache).
    profile = get_profile("256x384-fp32")
    paths = build(tmp_path_factory, bundle, profile, profile.name)
    out = paths["fused_step"].parent
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "surgery", "--weights", TINY, "--out", str(out),
               "--cache", str(session_root(tmp_path_factory) / "weights")]
    result = subprocess.run(command + ["--profile", profile.name], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "reusing" in result.stderr
    assert result.stdout.split() == [w for n in NETWORKS for w in (n, str(paths[n]))]
    bad = subprocess.run(command + ["--profile", "13x13-fp32"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "unknown profile" in bad.stderr

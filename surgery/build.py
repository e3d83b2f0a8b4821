"""build_onnx: export + surgery of the four ONNX files of one profile, cached under a manifest.

Writes `text_encoder.onnx`, `hint_encoder.onnx`, `fused_step.onnx` and `vae_decoder.onnx` (plus `<name>.onnx.data`
for any over 2 GB) into `out_dir` with a `manifest.json` keyed on the profile's shapes and precision, the weights
hash, the versions of the libraries that shape the graphs and SURGERY_VERSION. A file is reused only when that key
matches and its sha256 is the recorded one, so an unchanged rerun is a no-op, and a corrupted or half-written file
is rebuilt (only that network). Progress (stage, seconds, file size) goes to stderr.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

from artifacts.manifest import Manifest
from models.bundle import ModelBundle
from models.step import NETWORK_OUTPUTS
from profiles.config import Precision, Profile, get_profile
from surgery.export import ExportOptions, PartExporter
from surgery.layout import NETWORKS, log, manifest_key, onnx_filename, onnx_paths


@contextlib.contextmanager
def _stage(label: str):
    start = time.perf_counter()
    yield
    log(f"[onnx] {label}: {time.perf_counter() - start:.1f} s")


def build_onnx(bundle: ModelBundle, profile: "Profile | str", out_dir: "str | Path",
               precision: "Precision | str | None" = None, *, options: "ExportOptions | None" = None,
               external_data_threshold: "int | None" = None) -> dict[str, Path]:
    """Build (or reuse) the four ONNX files; returns {network: path of its .onnx}.

    precision defaults to the profile's. `options`: exporter and opset (both part of the manifest key);
    `external_data_threshold` (bytes of weights) overrides when a file keeps its weights in `<name>.onnx.data`.
    """
    profile = get_profile(profile)
    precision = Precision(precision or profile.precision)
    out_dir = Path(out_dir)
    options = options or ExportOptions()
    key = manifest_key(profile, bundle.weights_id, precision, options.exporter_name, options.opset)
    manifest = Manifest.load(out_dir)
    if manifest is not None and manifest.key != key:
        log(f"[onnx] {out_dir}: existing files are stale ({_key_changes(manifest.key, key)} changed)")
    if manifest is None or manifest.key != key:
        manifest = Manifest(key)
    todo = [net for net in NETWORKS if not _is_fresh(manifest, out_dir, net)]
    paths = onnx_paths(out_dir)
    if not todo:
        log(f"[onnx] reusing {', '.join(onnx_filename(n) for n in NETWORKS)} in {out_dir} "
            f"({profile.name}, {precision.value}): manifest key and sha256 match, nothing to do")
        return paths

    # onnx / graphsurgeon only when something is actually built.
    from surgery.onnx_io import EXTERNAL_DATA_THRESHOLD, STAGING_PREFIX, remove_staging_leftovers

    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_staging_leftovers(out_dir)
    log(f"[onnx] building {', '.join(todo)} for {profile.name} ({precision.value}, "
        f"{profile.height}x{profile.width}, batch {profile.num_samples}) into {out_dir}")
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}export.", dir=out_dir) as work:
        exporter = PartExporter(bundle, profile, precision, Path(work), options)
        for network in todo:
            # Forget the old files first: from here until the new ones are recorded, nothing vouches for them.
            for role in [r for r in manifest.artifacts if _role_network(r) == network]:
                del manifest.artifacts[role]
            manifest.save(out_dir)
            written = _build_network(exporter, network, out_dir, threshold)
            for path in written:
                manifest.record(out_dir, _role(network, path), path)
            manifest.save(out_dir)
    log(f"[onnx] done in {time.perf_counter() - total:.1f} s")
    return paths


def _build_network(exporter, network: str, out_dir: Path, threshold: int) -> list[Path]:
    from surgery.onnx_io import load_graph, save_graph
    from surgery.passes import apply_passes

    if network == "fused_step":
        from surgery.fuse import fused_step_passes, glue_graph

        with _stage("export controlnet + unet + update"):
            parts = {name: load_graph(part.path) for name, part in exporter.fused_step_parts().items()}
        # The dynamo exporter writes opset 18 whatever it is asked for: the merged graph takes the parts' opset.
        opset = max(part.opset for part in parts.values())
        graph, wires = glue_graph(exporter.io[network], exporter.precision, opset)
        merges = fused_step_passes(parts, wires)
    else:
        with _stage(f"export {network}"):
            graph = load_graph(exporter.network(network).path)
        merges = []
    with _stage(f"surgery {network}"):
        apply_passes(graph, merges + network_passes(network, exporter.io[network], exporter.precision), network)
    start = time.perf_counter()
    written = save_graph(graph, out_dir, network, threshold)
    size = sum(p.stat().st_size for p in written)
    log(f"[onnx] wrote {' + '.join(p.name for p in written)} ({size / 1e6:.1f} MB) in "
        f"{time.perf_counter() - start:.1f} s")
    return written


def network_passes(network: str, io, precision: Precision) -> list:
    """The ordered cleanup passes every exported (or merged) graph goes through."""
    from surgery import passes as P
    from surgery.precision import upcast_to_fp32

    outputs = NETWORK_OUTPUTS[network]
    inputs = [name for name in io if name not in outputs]
    ordered = [P.remove_identity, P.infer_shapes, P.fold_constants, P.remove_noop_casts, P.remove_unit_arithmetic,
               P.remove_dead_nodes, P.clear_intermediate_shapes]
    if Precision(precision) is Precision.FP16:
        ordered.append(upcast_to_fp32())
    ordered.append(P.require_io(inputs, outputs))
    return ordered


def _key_changes(old: dict, new: dict, prefix: str = "") -> str:
    """The key fields that differ, e.g. 'libraries.torch, weights_id', to say why a build is not reused."""
    changed = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _key_changes(a, b, f"{prefix}{name}.")
            changed += [inner] if inner else []
        elif a != b:
            changed.append(prefix + name)
    return ", ".join(changed)


def _role(network: str, path: Path) -> str:
    return network if path.name == onnx_filename(network) else f"{network}.data"


def _role_network(role: str) -> str:
    return role.split(".", 1)[0]


def _is_fresh(manifest: Manifest, out_dir: Path, network: str) -> bool:
    roles = [r for r in manifest.artifacts if _role_network(r) == network]
    return network in roles and manifest.is_fresh(out_dir, manifest.key, roles)

"""Reading exported parts and writing finished ONNX files: atomically, with external data when over 2 GB.

A protobuf message cannot exceed 2 GB, and the real sd15 fused step is ~4.8 GB in fp32 (2.4 GB in fp16), so big
graphs keep their weights in one side file `<name>.onnx.data` next to `<name>.onnx`. The .onnx file names that
side file by a relative path fixed at save time, so the pair cannot be written as temp files and renamed one by
one under other names: both are saved under their final names in a private staging folder in the destination
directory, then renamed into place, data first. A build interrupted before the last rename leaves only the
staging folder (removed on the next build); one interrupted between the two renames leaves a new .data beside the
old .onnx, which the manifest's sha256 records reject (surgery/build.py drops a network's records before
rewriting it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from surgery.layout import external_data_filename, onnx_filename

# Stay well below protobuf's 2 GiB hard limit: the graph itself (names, attributes) adds to the weights.
EXTERNAL_DATA_THRESHOLD = 1 << 30
STAGING_PREFIX = ".staging-"


def load_graph(path: "str | Path") -> gs.Graph:
    """An exported file (external data, if the exporter wrote any, is read from its folder) as a gs graph."""
    return gs.import_onnx(onnx.load(str(path), load_external_data=True))


def weights_nbytes(graph: gs.Graph) -> int:
    return sum(t._values.nbytes for t in graph.tensors().values() if isinstance(t, gs.Constant))


def save_graph(graph: gs.Graph, out_dir: "str | Path", network: str,
               external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write `<out_dir>/<network>.onnx` (and `.onnx.data` if the weights exceed the threshold) atomically, check it
    with onnx.checker (full check: types and shapes too), and return the written paths, .onnx first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    external = weights_nbytes(graph) > external_data_threshold
    model = gs.export_onnx(graph)
    # The IR version that goes with the graph's opset (not the newest onnx's): older parsers (TensorRT 8.6) take it.
    model.ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", graph.opset)])
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{network}.", dir=out_dir))
    try:
        onnx.save_model(model, str(staging / onnx_filename(network)), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=external_data_filename(network), size_threshold=1024)
        del model
        # Tensors under 1 KB stay inline, so a side file exists only if some weight was big enough.
        names = [onnx_filename(network)] + [external_data_filename(network)] * (
            (staging / external_data_filename(network)).is_file())
        onnx.checker.check_model(str(staging / names[0]), full_check=True)
        for name in reversed(names):  # data first: the .onnx appears last, only once its weights are in place
            os.replace(staging / name, out_dir / name)
        if len(names) == 1:
            (out_dir / external_data_filename(network)).unlink(missing_ok=True)  # an older build's weights
        return [out_dir / name for name in names]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_staging_leftovers(out_dir: "str | Path") -> None:
    """Delete staging/export folders a killed build left behind (one build per directory at a time)."""
    for leftover in Path(out_dir).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)

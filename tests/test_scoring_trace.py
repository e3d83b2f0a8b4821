"""--trace: a chrome trace of one call, written atomically, plain or gzipped (a tiny torch op stands in for
process(); profiling the CPU pipeline takes minutes on 2 cores)."""

import gzip
import json

import torch

from scoring.trace import write_trace


def _call():
    a = torch.randn(64, 64)
    return torch.nn.functional.relu(a @ a)


def test_trace_is_chrome_json(tmp_path):
    path = write_trace(_call, tmp_path / "trace.json", "cpu")
    events = json.loads(path.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]


def test_gz_suffix_gives_a_gzipped_trace(tmp_path):
    path = write_trace(_call, tmp_path / "trace.json.gz", "cpu")
    with gzip.open(path, "rt") as f:
        assert json.load(f)["traceEvents"]
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json.gz"]

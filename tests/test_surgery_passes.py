"""Each surgery pass on a tiny synthetic graph built here with onnx.helper / graphsurgeon, checked by structure
and, where it computes something, by running the graph before and after with onnxruntime (exact: these passes
must not change a single bit)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from profiles import ControlNetRTError
from surgery import passes as P
from surgery.onnx_io import save_graph
from surgery.precision import upcast_to_fp32

OPSET = 17


def make_graph(nodes, inputs, outputs, initializers=()) -> gs.Graph:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return gs.import_onnx(model)


def vinfo(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, values):
    return onnx.numpy_helper.from_array(np.asarray(values), name)


def run(graph: gs.Graph, feed: dict) -> list:
    model = gs.export_onnx(graph.copy())
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def ops(graph):
    return [n.op for n in graph.nodes]


X = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)


def test_remove_identity_keeps_output_names_and_values():
    graph = make_graph(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("Identity", ["b"], ["y"]), helper.make_node("Identity", ["x"], ["z"])],
        [vinfo("x", [2, 3])], [vinfo("y", [2, 3]), vinfo("z", [2, 3])])
    before = run(graph, {"x": X})
    P.remove_identity(graph)
    # x -> z joins a graph input to a graph output: that Identity must stay (both names are the contract).
    assert ops(graph) == ["Relu", "Identity"]
    assert [t.name for t in graph.outputs] == ["y", "z"]
    after = run(graph, {"x": X})
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_infer_shapes_then_fold_constants_folds_shape_chains():
    # y = Reshape(x, Shape(x)[::-1]) + (c1 * c2): with a static x every shape op and the constant product fold.
    graph = make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Shape", ["r"], ["s"]),
         helper.make_node("Slice", ["s", "start", "end", "axis", "step"], ["s_rev"]),
         helper.make_node("Reshape", ["r", "s_rev"], ["reshaped"]),
         helper.make_node("Mul", ["c1", "c2"], ["c"]),
         helper.make_node("Add", ["reshaped", "c"], ["y"])],
        [vinfo("x", [2, 3])], [vinfo("y", [3, 2])],
        [init("start", [-1]), init("end", [-3]), init("axis", [0]), init("step", [-1]),
         init("c1", np.full((3, 2), 2.0, np.float32)), init("c2", np.full((3, 2), 0.5, np.float32))])
    before = run(graph, {"x": X})
    P.infer_shapes(graph)
    assert graph.tensors()["r"].shape == [2, 3] or tuple(graph.tensors()["r"].shape) == (2, 3)
    P.fold_constants(graph)
    assert ops(graph) == ["Relu", "Reshape", "Add"]
    assert isinstance(graph.nodes[1].inputs[1], gs.Constant)
    assert list(graph.nodes[1].inputs[1].values) == [3, 2]
    assert np.array_equal(before[0], run(graph, {"x": X})[0])


def test_remove_noop_casts_keeps_real_conversions():
    graph = make_graph(
        [helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
         helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)],
        [vinfo("x", [2, 3])], [vinfo("y", [2, 3])])
    before = run(graph, {"x": X})
    P.remove_noop_casts(graph)
    assert [n.attrs["to"] for n in graph.nodes] == [TensorProto.FLOAT16, TensorProto.FLOAT]
    assert np.array_equal(before[0], run(graph, {"x": X})[0])


def test_remove_unit_arithmetic_only_where_exact_and_shape_preserving():
    graph = make_graph(
        [helper.make_node("Div", ["x", "one"], ["a"]),          # x / 1: removed
         helper.make_node("Mul", ["one", "a"], ["b"]),          # 1 * a: removed
         helper.make_node("Mul", ["b", "two"], ["c"]),          # b * 2: kept
         helper.make_node("Mul", ["c", "one_rank3"], ["y"])],   # broadcasts (2,3) -> (1,2,3): kept
        [vinfo("x", [2, 3])], [vinfo("y", [1, 2, 3])],
        [init("one", np.float32(1.0)), init("two", np.float32(2.0)),
         init("one_rank3", np.ones((1, 1, 1), np.float32))])
    before = run(graph, {"x": X})
    P.remove_unit_arithmetic(graph)
    assert ops(graph) == ["Mul", "Mul"]
    assert float(graph.nodes[0].inputs[1].values) == 2.0
    after = run(graph, {"x": X})
    assert after[0].shape == (1, 2, 3) and np.array_equal(before[0], after[0])


def test_remove_dead_nodes_keeps_unused_inputs():
    graph = make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["dead"]),
         helper.make_node("Abs", ["dead"], ["dead2"])],
        [vinfo("x", [2, 3]), vinfo("unused", [1])], [vinfo("y", [2, 3])])
    P.remove_dead_nodes(graph)
    assert ops(graph) == ["Relu"]
    assert [t.name for t in graph.inputs] == ["x", "unused"]


def test_clear_intermediate_shapes_keeps_boundary():
    graph = make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
                       [vinfo("x", [2, 3])], [vinfo("y", [2, 3])])
    P.infer_shapes(graph)
    assert graph.tensors()["a"].dtype is not None
    P.clear_intermediate_shapes(graph)
    tensors = graph.tensors()
    assert tensors["a"].shape is None and tensors["a"].dtype is None
    assert list(tensors["x"].shape) == [2, 3] and list(tensors["y"].shape) == [2, 3]


def test_prefix_and_rename_io():
    graph = make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vinfo("x", [2, 3])],
                       [vinfo("y", [2, 3])])
    graph.nodes[0].name = "/relu"  # the TorchScript exporter's scoped style
    P.prefix_names("net/")(graph)
    assert graph.nodes[0].name == "net/relu" and set(graph.tensors()) == {"net/x", "net/y"}
    P.rename_io({"net/x": "sample", "net/y": "out"})(graph)
    assert [t.name for t in graph.inputs] == ["sample"] and [t.name for t in graph.outputs] == ["out"]
    with pytest.raises(ControlNetRTError, match="no input/output named"):
        P.rename_io({"nope": "x"})(graph)


def test_merge_subgraph_wires_outputs_to_inputs():
    host = make_graph([helper.make_node("Relu", ["x"], ["r"])], [vinfo("x", [2, 3])], [])
    part = make_graph([helper.make_node("Sub", ["u", "v"], ["w"], name="sub")],
                      [vinfo("u", [2, 3]), vinfo("v", [2, 3])], [vinfo("w", [2, 3])])
    P.merge_subgraph(part, "part/", {"u": "r", "v": "x"}, outputs={"w": "y"})(host)
    P.apply_passes(host, [], "merge-test")
    assert [n.name for n in host.nodes][-1] == "part/sub"
    assert [t.name for t in host.inputs] == ["x"] and [t.name for t in host.outputs] == ["y"]
    (y,) = run(host, {"x": X})
    assert np.array_equal(y, np.maximum(X, 0) - X)


def test_merge_subgraph_refuses_dangling_inputs():
    host = make_graph([helper.make_node("Relu", ["x"], ["r"])], [vinfo("x", [2, 3])], [])
    part = make_graph([helper.make_node("Sub", ["u", "v"], ["w"])], [vinfo("u", [2, 3]), vinfo("v", [2, 3])],
                      [vinfo("w", [2, 3])])
    with pytest.raises(ControlNetRTError, match=r"unconnected part inputs \['v'\]"):
        P.merge_subgraph(part, "part/", {"u": "r"})(host)


def test_require_io():
    graph = make_graph([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", [2, 3])], [vinfo("y", [2, 3])])
    P.require_io(["x"], ["y"])(graph)
    with pytest.raises(ControlNetRTError, match="contract"):
        P.require_io(["x", "t"], ["y"])(graph)


def test_apply_passes_logs_counts_and_toposorts(capsys):
    graph = make_graph([helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])],
                       [vinfo("x", [2, 3])], [vinfo("y", [2, 3])])
    P.apply_passes(graph, [P.remove_identity, P.prefix_names("p/")], "toy")
    err = capsys.readouterr().err
    assert "toy: remove_identity" in err and "toy: prefix_names('p/')" in err and "2 nodes" in err
    assert ops(graph) == ["Relu", "Neg"]


def _fp16_norm_graph() -> gs.Graph:
    """x (f32) -> Cast fp16 -> LayerNormalization (fp16 params) -> Softmax (fp16) -> Cast f32 -> y, and a float32
    Softmax branch (x -> Softmax -> z) that must stay as it is."""
    rng = np.random.default_rng(1)
    return make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
         helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1, name="ln"),
         helper.make_node("Softmax", ["n"], ["s"], axis=-1, name="sm"),
         helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT),
         helper.make_node("Softmax", ["x"], ["z"], axis=-1, name="sm32")],
        [vinfo("x", [4, 8])], [vinfo("y", [4, 8]), vinfo("z", [4, 8])],
        [init("gamma", rng.standard_normal(8).astype(np.float16)),
         init("beta", rng.standard_normal(8).astype(np.float16))])


def test_upcast_to_fp32_runs_norms_in_float32():
    graph = _fp16_norm_graph()
    x = (np.random.default_rng(2).standard_normal((4, 8)) * 30).astype(np.float32)
    before = run(graph, {"x": x})
    upcast_to_fp32()(graph)
    P.apply_passes(graph, [], "upcast-test")
    types = P.infer_tensor_types(graph)
    by_name = {n.name: n for n in graph.nodes}
    for name in ("ln", "sm"):
        node = by_name[name]
        assert all(types[t.name] == np.float32 for t in node.inputs), name
        assert types[node.outputs[0].name] == np.float32
    assert ops(graph).count("Cast") == 2 + 4  # the original two, plus in/out around LN and Softmax
    assert by_name["sm32"].inputs[0].name == "x"  # already float32: untouched
    model = gs.export_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    after = run(graph, {"x": x})
    # Same maths at higher internal precision: agrees with the all-fp16 version to fp16 rounding.
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=2e-3)
    assert np.array_equal(after[1], before[1])


def test_save_graph_external_data_and_atomicity(tmp_path):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((3, 300)).astype(np.float32)  # over onnx's 1 KB inline limit
    graph = make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], [vinfo("x", [2, 3])], [vinfo("y", [2, 300])],
                       [init("w", weight)])
    written = save_graph(graph, tmp_path, "toy", external_data_threshold=0)
    assert [p.name for p in written] == ["toy.onnx", "toy.onnx.data"]
    sess = ort.InferenceSession(str(written[0]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": X})[0], X @ weight, rtol=1e-6)
    # Rewritten small: the stale side file goes, the graph is self-contained.
    assert [p.name for p in save_graph(graph, tmp_path, "toy")] == ["toy.onnx"]
    assert not (tmp_path / "toy.onnx.data").exists()
    # A graph the checker rejects (float + int64) is never moved into place, and no staging folder remains.
    bad = make_graph([helper.make_node("Add", ["x", "i"], ["y"])], [vinfo("x", [2, 3]), vinfo("i", [2, 3],
                     TensorProto.INT64)], [vinfo("y", [2, 3])])
    with pytest.raises(Exception):
        save_graph(bad, tmp_path, "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.onnx"]

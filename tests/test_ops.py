"""The op table (onnxdgh.ops), the graph view (onnxdgh.graph.GraphView) and the marking registry."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxdgh import graph as g
from onnxdgh.ops import OPS, output_bounds, output_channel_axis, output_channels, spec, weight_axis
from onnxdgh.quantization.plan import POLICIES


@pytest.mark.parametrize(
    ("op", "attrs", "shape", "axis", "channels"),
    [
        ("Conv", {}, (8, 3, 3, 3), 0, 8),
        ("ConvTranspose", {"group": 2}, (4, 3, 2, 2), 1, 6),
        ("Gemm", {"transB": 1}, (10, 4), 0, 10),
        ("Gemm", {}, (4, 10), 1, 10),
        ("MatMul", {}, (4, 10), 1, 10),
        ("MatMul", {}, (10,), None, 1),
    ],
)
def test_weight_layout(op: str, attrs: dict, shape: tuple, axis: int | None, channels: int) -> None:
    assert weight_axis(op, attrs, len(shape)) == axis
    assert output_channels(op, attrs, shape) == channels


def test_output_channel_axis_of_weighted_ops() -> None:
    # Where a bias adds: N x C x ... for convolutions, the last axis for Gemm and MatMul.
    assert [output_channel_axis(op) for op in ("Conv", "ConvTranspose", "Gemm", "MatMul")] == [1, 1, -1, -1]


def test_output_bounds_of_fixed_and_clip_ops() -> None:
    constants = {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    assert output_bounds("Relu", {}, ["x"], constants.get) == (0.0, math.inf)
    assert output_bounds("HardSigmoid", {}, ["x"], constants.get) == (0.0, 1.0)
    assert output_bounds("Add", {}, ["x", "y"], constants.get) is None
    assert output_bounds("Clip", {}, ["x", "lo", "hi"], constants.get) == (0.0, 6.0)  # opset >= 11
    assert output_bounds("Clip", {"min": 0.0, "max": 6.0}, ["x"], constants.get) == (0.0, 6.0)  # opset 6
    assert output_bounds("Clip", {}, ["x", "", "hi"], constants.get) == (-math.inf, 6.0)
    assert output_bounds("Clip", {}, ["x", "computed"], constants.get) is None


def test_every_table_op_has_a_marking_policy_and_no_other() -> None:
    assert set(POLICIES) == set(OPS)
    assert spec("Mod") == spec("NoSuchOp") and not spec("Mod").preserves  # unknown: all "no"


def test_graph_view_constants_labels_and_attributes() -> None:
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([2.0], np.float32))),
        helper.make_node("Mul", ["x", "k"], ["m"], name="mul"),
        helper.make_node("Pad", ["m", "pads"], ["y"], mode="reflect"),
    ]
    graph = helper.make_graph(
        nodes, "view", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads")],
    )
    view = g.GraphView(helper.make_model(graph))
    assert view.constant("k").tolist() == [2.0] and view.constant_type("k") == onnx.TensorProto.FLOAT
    assert view.constant("pads").tolist() == [0, 1, 0, 1] and "pads" in view.initializers and "k" not in view.initializers
    assert view.constant("m") is None and view.constant("x") is None
    nodes = list(view.graph.node)  # the graph holds copies of the nodes made above
    assert [view.label(node) for node in nodes] == ["Constant_0", "mul", "Pad_2"]
    assert view.readers("m") == [nodes[2]] and view.producers["y"] is nodes[2]
    assert g.attribute(nodes[2], "mode", "constant") == "reflect"  # bytes decoded
    assert g.attribute(nodes[1], "group", 1) == 1  # absent: the default

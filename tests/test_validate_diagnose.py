"""Where the error is made: input SQNR of each layer, the first bad layer and the option that addresses it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from onnx import numpy_helper

from onnxdgh import validate
from onnxdgh.validation.diagnose import DROP_DB, diagnose, input_sqnr

from .helpers_validate import copy, float_model, images, quantized_model, set_init

FLOAT = float_model()


def test_input_sqnr_walks_back_through_uncompared_tensors() -> None:
    sqnr = {"input": 45.0, "relu_out": 30.0, "pool_out": 29.0, "cat_out": 29.0, "gap_out": 35.0}
    upstream = input_sqnr(FLOAT, sqnr)
    assert upstream["input"] is None  # the graph input has no producer
    assert upstream["relu_out"] == 45.0  # relu <- conv_out (fused, not compared) <- input
    assert upstream["pool_out"] == 30.0
    assert upstream["cat_out"] == 29.0
    assert upstream["gap_out"] == 29.0


def _row(tensor: str, node: str, op: str, sqnr: float, inp: float | None) -> SimpleNamespace:
    return SimpleNamespace(tensor=tensor, node=node, op_type=op, sqnr_db=sqnr, input_sqnr_db=inp)


def test_first_bad_layer_is_the_first_large_drop_in_graph_order() -> None:
    rows = [
        _row("gap_out", "gap", "GlobalAveragePool", 5.0, 20.0),  # larger drop, but later in the graph
        _row("relu_out", "relu", "Relu", 35.0, 45.0),
        _row("pool_out", "pool", "MaxPool", 34.0, 35.0),  # below DROP_DB
        _row("input", "(graph input)", "Input", 45.0, None),
    ]
    result = diagnose(FLOAT, rows)
    assert result is not None
    first = result["first_bad_layer"]
    assert first["node"] == "relu" and first["drop_db"] == pytest.approx(10.0)
    assert first["kind"] == "weighted" and "--optimize-rounding" in first["options"]  # the fused Conv's weights
    assert [item["node"] for item in result["largest_drops"]][:2] == ["gap", "relu"]
    assert result["largest_drops"][0]["kind"] == "other" and "--threshold" in result["largest_drops"][0]["options"]


def test_no_bad_layer_when_drops_are_small_or_harmless() -> None:
    rows = [_row("relu_out", "relu", "Relu", 45.0 - DROP_DB + 0.5, 45.0),
            _row("gap_out", "gap", "GlobalAveragePool", 41.0, 50.0)]  # big drop, but still above QUIET_DB
    result = diagnose(FLOAT, rows)
    assert result is not None and result["first_bad_layer"] is None
    assert diagnose(FLOAT, [_row("input", "(graph input)", "Input", 45.0, None)]) is None


def test_validation_report_names_the_layer_with_damaged_weights() -> None:
    quant = quantized_model(FLOAT)
    damaged = copy(quant)
    weights = numpy_helper.to_array(next(t for t in damaged.graph.initializer if t.name == "conv_w_quantized"))
    set_init(damaged, "conv_w_quantized", (np.sign(weights) * 64).astype(weights.dtype))  # 1-bit-like weights
    report = validate(damaged, FLOAT, data=images(24, seed=5)).to_dict()
    rows = {row["tensor"]: row for row in report["layers"]}
    assert rows["relu_out"]["input_sqnr_db"] == rows["input"]["sqnr_db"]
    assert rows["relu_out"]["sqnr_drop_db"] > DROP_DB
    assert report["diagnosis"]["first_bad_layer"]["node"] == "relu"
    clean = validate(quant, FLOAT, data=images(24, seed=5)).to_dict()
    clean_drop = next(row for row in clean["layers"] if row["tensor"] == "relu_out")["sqnr_drop_db"]
    assert rows["relu_out"]["sqnr_drop_db"] > clean_drop + 10.0

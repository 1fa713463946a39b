"""BN folding and op normalisation: same function (checked in onnxruntime), expected graph shape."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdgh.errors import QuantizationError
from onnxdgh.quantize.fold import prepare

from .helpers_quantize import conv_weight, images, make_model, op_counts, rng, run

N = helper.make_node


def _bn_params(prefix: str, channels: int, seed: int) -> dict[str, np.ndarray]:
    r = rng(seed)
    return {
        f"{prefix}_gamma": r.uniform(0.5, 2.0, channels).astype(np.float32),
        f"{prefix}_beta": r.standard_normal(channels).astype(np.float32) * 0.3,
        f"{prefix}_mean": r.standard_normal(channels).astype(np.float32) * 0.5,
        f"{prefix}_var": r.uniform(0.2, 3.0, channels).astype(np.float32),
    }


def _bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return N(
        "BatchNormalization",
        [x, f"{prefix}_gamma", f"{prefix}_beta", f"{prefix}_mean", f"{prefix}_var"],
        [y],
        name=prefix,
        epsilon=1e-3,
    )


def _same_function(model: onnx.ModelProto, folded: onnx.ModelProto, shape=(3, 8, 8)) -> None:
    x = images(4, shape, seed=11)
    expected = run(model, x)
    got = run(folded, x)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_conv_bn_folds_with_and_without_bias() -> None:
    nodes = [
        N("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        _bn("bn0", "c0", "h"),
        N("Conv", ["h", "w1"], ["c1"], name="conv1"),
        _bn("bn1", "c1", "y"),
    ]
    inits = {"w0": conv_weight(4, 3), "b0": np.full(4, 0.2, np.float32), "w1": conv_weight(5, 4, 1, 2)}
    inits |= _bn_params("bn0", 4, 1) | _bn_params("bn1", 5, 2)
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.folded == ["bn0", "bn1"] and report.converted == []
    assert op_counts(folded) == {"Conv": 2}
    assert len(folded.graph.node[1].input) == 3  # conv1 gained a bias
    _same_function(model, folded)


def test_grouped_conv_transpose_bn_folds() -> None:
    w = rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)  # C_in 4, group 2 -> C_out 6
    nodes = [
        N("Conv", ["x", "w0"], ["h0"], name="conv0"),
        N("ConvTranspose", ["h0", "wt", "bt"], ["t"], name="deconv", group=2, strides=[2, 2]),
        _bn("bn", "t", "y"),
    ]
    inits = {"w0": conv_weight(4, 3, 1), "wt": w, "bt": np.linspace(-1, 1, 6).astype(np.float32)}
    inits |= _bn_params("bn", 6, 4)
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.folded == ["bn"]
    _same_function(model, folded)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folds_with_alpha_beta(trans_b: int) -> None:
    w = rng(5).standard_normal((6, 192) if trans_b else (192, 6)).astype(np.float32) * 0.1
    nodes = [
        N("Flatten", ["x"], ["f"], name="flat"),
        N("Gemm", ["f", "w", "c"], ["g"], name="gemm", transB=trans_b, alpha=0.5, beta=2.0),
        _bn("bn", "g", "y"),
    ]
    inits = {"w": w, "c": np.linspace(-0.5, 0.5, 6).astype(np.float32)} | _bn_params("bn", 6, 6)
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.folded == ["bn"] and report.gemm_normalised == 1
    gemm = next(node for node in folded.graph.node if node.op_type == "Gemm")
    assert all(attr.f == 1.0 for attr in gemm.attribute if attr.name in ("alpha", "beta"))
    _same_function(model, folded)


def test_bn_with_nothing_to_fold_into_becomes_depthwise_conv() -> None:
    # BN after an Add (pre-activation style): no producer to fold into.
    nodes = [
        N("Conv", ["x", "w0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
        N("Add", ["a", "x3"], ["s"], name="add"),
        _bn("bn", "s", "y"),
    ]
    inits = {"w0": conv_weight(3, 3), "x3": np.full((3, 1, 1), 0.1, np.float32)} | _bn_params("bn", 3, 7)
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.converted == ["bn"] and report.folded == []
    conv = [node for node in folded.graph.node if node.op_type == "Conv"][-1]
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 3
    _same_function(model, folded)


def test_bn_whose_conv_output_has_other_readers_is_not_folded() -> None:
    nodes = [
        N("Conv", ["x", "w0"], ["c"], name="conv0"),
        _bn("bn", "c", "b"),
        N("Add", ["b", "c"], ["y"], name="add"),
    ]
    model = make_model(nodes, {"w0": conv_weight(4, 3, 1)} | _bn_params("bn", 4, 8))
    folded, report = prepare(model)
    assert report.converted == ["bn"]
    _same_function(model, folded)


def test_rank2_bn_becomes_mul_add() -> None:
    nodes = [N("Flatten", ["x"], ["f"], name="flat"), N("ReduceMean", ["f"], ["m"], name="rm", axes=[1], keepdims=1),
             N("Sub", ["f", "m"], ["d"], name="sub"), _bn("bn", "d", "y")]
    model = make_model(nodes, _bn_params("bn", 48, 9), input_shape=("batch", 3, 4, 4))
    folded, report = prepare(model)
    assert report.converted == ["bn"]
    assert op_counts(folded).get("Mul") == 1 and op_counts(folded).get("Add") == 1
    _same_function(model, folded, shape=(3, 4, 4))


def test_shared_weight_is_copied_not_rescaled_twice() -> None:
    nodes = [
        N("Conv", ["x", "w"], ["c0"], name="conv0"),
        _bn("bn0", "c0", "h0"),
        N("Conv", ["x", "w"], ["c1"], name="conv1"),
        _bn("bn1", "c1", "h1"),
        N("Add", ["h0", "h1"], ["y"], name="add"),
    ]
    model = make_model(nodes, {"w": conv_weight(4, 3, 1)} | _bn_params("bn0", 4, 10) | _bn_params("bn1", 4, 11))
    folded, report = prepare(model)
    assert report.folded == ["bn0", "bn1"]
    convs = [node for node in folded.graph.node if node.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]
    _same_function(model, folded)


def test_div_by_constant_becomes_mul_and_dropout_goes() -> None:
    nodes = [
        N("Div", ["x", "d"], ["a"], name="div"),
        N("Dropout", ["a"], ["b"], name="drop"),
        N("Div", ["b", "x"], ["y"], name="div_by_tensor"),
    ]
    model = make_model(nodes, {"d": np.array(4.0, np.float32)})
    folded, report = prepare(model)
    assert report.div_to_mul == 1 and report.dropout_removed == 1
    assert op_counts(folded) == {"Mul": 1, "Div": 1}
    x = images(2, seed=3) + 5.0
    np.testing.assert_allclose(run(folded, x)[0], run(model, x)[0], rtol=1e-6)


def test_training_mode_bn_is_refused() -> None:
    bn = N(
        "BatchNormalization", ["x", "g_gamma", "g_beta", "g_mean", "g_var"], ["y", "rm", "rv"], name="bn_train",
        training_mode=1,
    )
    model = make_model([bn], _bn_params("g", 3, 12), opset=15)
    with pytest.raises(QuantizationError, match="bn_train"):
        prepare(model)


def test_input_model_is_not_modified() -> None:
    nodes = [N("Conv", ["x", "w0"], ["c0"], name="conv0"), _bn("bn0", "c0", "y")]
    model = make_model(nodes, {"w0": conv_weight(4, 3, 1)} | _bn_params("bn0", 4, 13))
    before = model.SerializeToString()
    prepare(model)
    assert model.SerializeToString() == before

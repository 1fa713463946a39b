"""Structural rules: for every rule id, a crafted graph that breaks it and one that passes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdgh.profile import Profile, load_profile
from onnxdgh.validation.checks import RULES, Violation, analyse, check_model

from .helpers_validate import copy, float_model, get_init, insert_after, node, quantized_model, set_init

GENERIC = load_profile("generic-pot-int8")
STRICT = load_profile("strict-pot-int8")
LOWBIT = load_profile("pot-lowbit")
W4A8 = load_profile("pot-w4a8")

_CACHE: dict[str, onnx.ModelProto] = {}


def good(per_channel: bool = True, bits: int = 8) -> onnx.ModelProto:
    """A fresh copy of a conforming QDQ model (built once per variant)."""
    key = f"{per_channel}-{bits}"
    if key not in _CACHE:
        _CACHE[key] = quantized_model(float_model(), per_channel=per_channel, weight_bits=bits, activation_bits=bits)
    return copy(_CACHE[key])


def weights_as_float(off_grid: bool = False) -> onnx.ModelProto:
    """The conforming model in the --weights-as-float flavour; ``off_grid`` moves one weight half a step."""
    import json

    from onnxdgh.quantization.float_weights import WEIGHT_GRID_KEY, store_weights_as_float

    model = store_weights_as_float(good())
    if off_grid:
        grid = json.loads({p.key: p.value for p in model.metadata_props}[WEIGHT_GRID_KEY])
        name = next(key for key, record in grid.items() if record["type"] == "int8")
        values = get_init(model, name).copy()
        values.reshape(-1)[0] += np.float32(np.asarray(grid[name]["scale"]).reshape(-1)[0] / 2)
        set_init(model, name, values)
    return model


def custom(**changes: object) -> Profile:
    return dataclasses.replace(GENERIC, name="custom", **changes)


def rules(model: onnx.ModelProto, profile: Profile) -> set[str]:
    return {v.rule for v in check_model(model, profile)}


# ---------------------------------------------------------------- mutations


def bad_opset() -> onnx.ModelProto:
    model = good(per_channel=False)
    model.opset_import[0].version = 18
    return model


def input_read_in_float() -> onnx.ModelProto:
    model = good()
    node(model, "conv").input[0] = "input"
    return model


def output_not_dequantized() -> onnx.ModelProto:
    model = good()
    node(model, "fc").output[0] = "logits"
    doomed = [n for n in model.graph.node if n.name in ("logits_QuantizeLinear", "logits_DequantizeLinear")]
    for item in doomed:
        model.graph.node.remove(item)
    return model


def maxpool_reads_float() -> onnx.ModelProto:
    model = good()
    node(model, "pool").input[0] = "relu_out"
    return model


def float_weight() -> onnx.ModelProto:
    model = good()
    set_init(model, "fc_w_float", np.ones((4, 6), np.float32))
    node(model, "fc").input[1] = "fc_w_float"
    return model


def pair_mismatch() -> onnx.ModelProto:
    model = good()
    set_init(model, "other_scale", get_init(model, "logits_scale") * 2)
    node(model, "logits_DequantizeLinear").input[1] = "other_scale"
    return model


def scale_not_pot() -> onnx.ModelProto:
    model = good()
    set_init(model, "logits_scale", np.array(0.1, np.float32))
    return model


def scale_computed() -> onnx.ModelProto:
    model = good()
    model.graph.node.insert(
        0, helper.make_node("Identity", ["logits_scale"], ["logits_scale_computed"], name="scale_copy")
    )
    node(model, "logits_QuantizeLinear").input[1] = "logits_scale_computed"
    node(model, "logits_DequantizeLinear").input[1] = "logits_scale_computed"
    return model


def zero_point_nonzero() -> onnx.ModelProto:
    model = good()
    set_init(model, "logits_zero_point", np.array(3, np.int8))
    return model


def activation_int16() -> onnx.ModelProto:
    model = good()
    set_init(model, "logits_zero_point", np.array(0, np.int16))
    return model


def per_channel_activation() -> onnx.ModelProto:
    model = good()
    scale = float(get_init(model, "logits_scale"))
    set_init(model, "logits_scale", np.array([scale, scale, scale / 2, scale], np.float32))
    set_init(model, "logits_zero_point", np.zeros(4, np.int8))
    return model


def weights_int16() -> onnx.ModelProto:
    model = good()
    values = get_init(model, "fc_w_quantized").astype(np.int16) * 8
    set_init(model, "fc_w_quantized", values)
    set_init(model, "fc_w_zero_point", np.zeros(4, np.int16))
    set_init(model, "fc_w_scale", get_init(model, "fc_w_scale") / 8)
    return model


def weights_uint8() -> onnx.ModelProto:
    model = good()
    values = np.abs(get_init(model, "fc_w_quantized").astype(np.int16)).astype(np.uint8)
    set_init(model, "fc_w_quantized", values)
    set_init(model, "fc_w_zero_point", np.zeros(4, np.uint8))
    return model


def bias_int8() -> onnx.ModelProto:
    model = good()
    set_init(model, "fc_b_quantized", np.clip(get_init(model, "fc_b_quantized"), -128, 127).astype(np.int8))
    set_init(model, "fc_b_zero_point", np.zeros(4, np.int8))
    return model


def bias_scale_wrong() -> onnx.ModelProto:
    model = good()
    set_init(model, "fc_b_scale", get_init(model, "fc_b_scale") * 2)
    return model


def batchnorm_left() -> onnx.ModelProto:
    model = good()
    for name, value in (("bn_s", 1.0), ("bn_b", 0.0), ("bn_m", 0.0), ("bn_v", 1.0)):
        set_init(model, name, np.full(3, value, np.float32))
    insert_after(
        model,
        "relu_out_DequantizeLinear",
        helper.make_node("BatchNormalization", ["relu_out_dq", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn_out"], name="bn"),
    )
    node(model, "pool").input[0] = "bn_out"
    return model


def custom_domain_op() -> onnx.ModelProto:
    model = good()
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    insert_after(model, "relu", helper.make_node("Gelu", ["relu_out"], ["gelu_out"], name="gelu", domain="com.example"))
    return model


def fused_branch() -> onnx.ModelProto:
    model = good()
    insert_after(
        model,
        "conv",
        helper.make_node("QuantizeLinear", ["conv_out", "relu_out_scale", "relu_out_zero_point"], ["conv_out_q"],
                         name="conv_out_QuantizeLinear"),
    )
    return model


def concat_input_scales_differ() -> onnx.ModelProto:
    model = good()
    set_init(model, "pool2_scale", get_init(model, "pool_out_scale") * 2)
    insert_after(
        model,
        "pool_out_DequantizeLinear",
        helper.make_node("QuantizeLinear", ["pool_out", "pool2_scale", "pool_out_zero_point"], ["pool2_q"], name="pool2_Q"),
    )
    insert_after(
        model,
        "pool2_Q",
        helper.make_node("DequantizeLinear", ["pool2_q", "pool2_scale", "pool_out_zero_point"], ["pool2_dq"], name="pool2_DQ"),
    )
    node(model, "cat").input[1] = "pool2_dq"
    return model


def concat_output_scale_differs() -> onnx.ModelProto:
    model = good()
    set_init(model, "cat_out_scale", get_init(model, "cat_out_scale") * 2)
    return model


def add_model(*, same: bool) -> onnx.ModelProto:
    """Concat replaced by Add of two differently (or equally) quantized copies; per-tensor weights."""
    model = concat_input_scales_differ() if not same else good()
    if same:
        node(model, "cat").input[1] = "pool_out_dq"
    cat = node(model, "cat")
    cat.op_type = "Add"
    del cat.attribute[:]
    # Add keeps 3 channels: the classifier then reads 3 features; shrink fc to match.
    set_init(model, "fc_w_quantized", get_init(model, "fc_w_quantized")[:, :3])
    return model


def value_preserving_scale() -> onnx.ModelProto:
    model = good()
    set_init(model, "pool_out_scale", get_init(model, "pool_out_scale") * 2)
    set_init(model, "cat_out_scale", get_init(model, "pool_out_scale"))
    return model


def pad_model(steps: float) -> onnx.ModelProto:
    """MaxPool replaced by a constant Pad whose fill is ``steps`` of its (uint8) input's scale."""
    model = good()
    pad = node(model, "pool")
    pad.op_type = "Pad"
    del pad.attribute[:]
    set_init(model, "pad_pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    set_init(model, "pad_fill", np.array(steps * float(get_init(model, "relu_out_scale")), np.float32))
    pad.input.extend(["pad_pads", "pad_fill"])
    return model


# (rule, model factory, profile): each breaks exactly the rule named (others may follow from it).
VIOLATING: list[tuple[str, Callable[[], onnx.ModelProto], Profile]] = [
    ("opset-range", bad_opset, STRICT),
    ("graph-input-not-quantized", input_read_in_float, GENERIC),
    ("graph-output-not-dequantized", output_not_dequantized, GENERIC),
    ("float-input-not-dequantized", maxpool_reads_float, GENERIC),
    ("float-input-not-dequantized", float_weight, GENERIC),
    ("float-input-not-dequantized", good, custom(fused_patterns=())),
    ("qdq-pair-mismatch", pair_mismatch, GENERIC),
    ("scale-not-power-of-two", scale_not_pot, GENERIC),
    ("scale-not-power-of-two", scale_computed, GENERIC),
    ("zero-point-not-zero", zero_point_nonzero, GENERIC),
    ("activation-bits", lambda: good(bits=4), GENERIC),
    ("activation-bits", activation_int16, GENERIC),
    ("activation-signedness", good, custom(activation_signedness=("signed",))),
    ("per-channel-activations", per_channel_activation, GENERIC),
    ("weight-bits", good, custom(weight_bits=(4,))),
    ("weight-bits", weights_int16, GENERIC),
    ("weight-signedness", weights_uint8, GENERIC),
    ("per-channel-weights", good, STRICT),
    ("bias-bits", bias_int8, GENERIC),
    ("bias-bits", good, custom(bias_bits=8)),
    ("bias-scale", bias_scale_wrong, GENERIC),
    ("batchnorm-left", batchnorm_left, GENERIC),
    ("op-not-allowed", good, custom(allowed_ops=tuple(op for op in GENERIC.allowed_ops if op != "Flatten"))),
    ("op-not-allowed", custom_domain_op, GENERIC),
    ("fused-pattern-branch", fused_branch, GENERIC),
    ("shared-scale", concat_input_scales_differ, GENERIC),
    ("shared-scale", concat_output_scale_differs, GENERIC),
    ("shared-scale", lambda: add_model(same=False), custom(shared_input_scale_ops=("Add",))),
    ("value-preserving-scale", value_preserving_scale, GENERIC),
    ("pad-value-off-grid", lambda: pad_model(2.5), GENERIC),
    ("pad-value-off-grid", lambda: pad_model(256), GENERIC),
    ("weight-off-grid", lambda: weights_as_float(off_grid=True), GENERIC),
]

# (rule, model factory, profile): conforming graphs that exercise the rule's allowance.
PASSING: list[tuple[str, Callable[[], onnx.ModelProto], Profile]] = [
    ("opset-range", lambda: good(per_channel=False), STRICT),
    ("graph-input-not-quantized", lambda: good(bits=4), LOWBIT),  # range Clip before the input's Q
    ("graph-output-not-dequantized", good, GENERIC),
    ("float-input-not-dequantized", good, GENERIC),  # Relu reads Conv directly: fused pattern
    ("qdq-pair-mismatch", good, GENERIC),
    ("scale-not-power-of-two", scale_not_pot, custom(power_of_two_scales=False)),
    ("zero-point-not-zero", zero_point_nonzero, custom(zero_point_zero=False)),
    ("activation-bits", lambda: good(bits=4), LOWBIT),
    ("activation-signedness", good, GENERIC),
    ("per-channel-activations", good, GENERIC),
    ("weight-bits", lambda: good(bits=4), custom(weight_bits=(4,), activation_bits=(4,))),
    ("weight-bits", good, W4A8),
    ("weight-signedness", weights_uint8, custom(weight_signedness=("signed", "unsigned"))),
    ("per-channel-weights", lambda: good(per_channel=False), STRICT),
    ("bias-bits", good, GENERIC),
    ("bias-scale", good, GENERIC),
    ("batchnorm-left", good, GENERIC),
    ("op-not-allowed", good, GENERIC),
    ("fused-pattern-branch", good, GENERIC),
    ("shared-scale", good, GENERIC),
    ("shared-scale", lambda: add_model(same=True), custom(shared_input_scale_ops=("Add",))),
    ("value-preserving-scale", good, GENERIC),
    ("pad-value-off-grid", lambda: pad_model(3), GENERIC),
    ("weight-off-grid", weights_as_float, GENERIC),
]


def test_every_rule_has_a_violating_and_a_passing_case() -> None:
    assert {rule for rule, _, _ in VIOLATING} == set(RULES)
    assert {rule for rule, _, _ in PASSING} == set(RULES)


@pytest.mark.parametrize(("rule", "factory", "profile"), VIOLATING, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(VIOLATING)])
def test_violation_found(rule: str, factory: Callable[[], onnx.ModelProto], profile: Profile) -> None:
    found = check_model(factory(), profile)
    hits = [v for v in found if v.rule == rule]
    assert hits, f"expected {rule}, got {[v.rule for v in found]}"
    for violation in hits:
        assert violation.message
        # Every violation except the model-wide opset rule names a node or a tensor.
        assert rule == "opset-range" or violation.node or violation.tensor


@pytest.mark.parametrize(("rule", "factory", "profile"), PASSING, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(PASSING)])
def test_conforming_graph_passes(rule: str, factory: Callable[[], onnx.ModelProto], profile: Profile) -> None:
    found = check_model(factory(), profile)
    assert rule not in {v.rule for v in found}, [v.message for v in found]


def test_conforming_models_have_no_violation_at_all() -> None:
    assert check_model(good(), GENERIC) == []
    assert check_model(good(per_channel=False), STRICT) == []
    assert check_model(good(bits=4), LOWBIT) == []
    for model in (good(), good(per_channel=False), good(bits=4)):
        onnx.checker.check_model(model, full_check=True)


def test_violation_names_node_and_tensor() -> None:
    found = [v for v in check_model(scale_not_pot(), GENERIC) if v.rule == "scale-not-power-of-two"]
    assert {(v.node, v.tensor) for v in found} == {
        ("logits_QuantizeLinear", "logits_prequant"),
        ("logits_DequantizeLinear", "logits_q"),
    }
    assert "0.1" in found[0].message
    pool = [v for v in check_model(maxpool_reads_float(), GENERIC) if v.rule == "float-input-not-dequantized"]
    assert [(v.node, v.tensor) for v in pool] == [("pool", "relu_out")]
    assert Violation("r", "n", "t", "m").to_dict() == {"rule": "r", "node": "n", "tensor": "t", "message": "m"}


def test_relu6_clip_is_not_a_range_clip() -> None:
    """A Clip(0, 6) reading Add's output directly is a compute op, not the quantizer's range Clip."""
    model = good()
    set_init(model, "six", np.array(6.0, np.float32))
    set_init(model, "zero", np.array(0.0, np.float32))
    # MaxPool -> Clip(0, 6) -> the existing pool quantizer: Clip reads MaxPool without Q/DQ.
    node(model, "pool").output[0] = "pool_raw"
    insert_after(model, "pool", helper.make_node("Clip", ["pool_raw", "zero", "six"], ["pool_out"], name="relu6"))
    found = check_model(model, GENERIC)
    assert ("float-input-not-dequantized", "relu6") in {(v.rule, v.node) for v in found}


def test_analysis_reports_roles_and_widths() -> None:
    q = analyse(good(bits=4))
    assert q.weight_bits_summary() == {"4": 2}
    assert q.activation_bits_summary() == {"4": 7}
    roles = {p.node: p.role for p in q.quantizers.values()}
    assert roles["fc_w_DequantizeLinear"] == "weight"
    assert roles["fc_b_DequantizeLinear"] == "bias"
    assert roles["relu_out_DequantizeLinear"] == "activation"
    sources = {p.output: p.source for p in q.activation_dequantizers()}
    assert sources["relu_out_dq"] == "relu_out"
    assert sources["logits"] == "logits_prequant"


def test_model_is_not_modified(tmp_path: Path) -> None:
    model = good()
    before = model.SerializeToString()
    check_model(model, STRICT)
    assert model.SerializeToString() == before


def test_docs_list_every_rule_and_builtin_profile() -> None:
    from onnxdgh.profile import builtin_profile_names

    text = (Path(__file__).resolve().parents[1] / "docs" / "VALIDATE.md").read_text()
    documented = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `") and line.count("|") == 3}
    assert set(RULES) <= documented
    for name in builtin_profile_names():
        assert f"`{name}`" in text

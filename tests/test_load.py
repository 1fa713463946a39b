"""Stage 1: safe loading refuses bad input; canonicalisation keeps what the graph computes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxdgh import load_model, load_model_proto
from onnxdgh.cli import main
from onnxdgh.errors import UnsupportedModelError
from onnxdgh.load import canonicalise, make_batch_dynamic

from .conftest import TinyConvBnRelu, export_onnx, ort_run, settle_bn

RNG = np.random.default_rng(0)


def _conv_bn_graph(*, constants: bool, opset: int = 17, input_type: int = TensorProto.FLOAT,
                   input_shape: tuple[int, ...] = (1, 2, 6, 6), extra_input: bool = False) -> onnx.ModelProto:
    """Conv -> BN -> Relu with weights either as initializers or as Constant nodes."""
    weight = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
    params = {
        "w": weight,
        "scale": RNG.uniform(0.5, 1.5, 4).astype(np.float32),
        "bias": RNG.standard_normal(4).astype(np.float32),
        "mean": RNG.standard_normal(4).astype(np.float32),
        "var": RNG.uniform(0.5, 2.0, 4).astype(np.float32),
    }
    nodes = []
    inits = []
    for name, value in params.items():
        if constants:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            inits.append(numpy_helper.from_array(value, name))
    nodes += [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    inputs = [helper.make_tensor_value_info("x", input_type, list(input_shape))]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 2, 6, 6]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _inspect(path: Path | str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["inspect", str(path)])
    return result.exit_code, result.output


# ------------------------------------------------------------------ refusals (exit 2)


def test_missing_file(tmp_path: Path) -> None:
    code, out = _inspect(tmp_path / "nope.onnx")
    assert code == 2 and "does not exist" in out and "hint:" in out


def test_directory(tmp_path: Path) -> None:
    code, out = _inspect(tmp_path)
    assert code == 2 and "is a folder" in out


def test_empty_file(tmp_path: Path) -> None:
    code, out = _inspect(_save_bytes(tmp_path / "e.onnx", b""))
    assert code == 2 and "is empty" in out


def _save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_truncated_file(tmp_path: Path, tiny_model_path: Path) -> None:
    data = tiny_model_path.read_bytes()
    code, out = _inspect(_save_bytes(tmp_path / "t.onnx", data[: len(data) // 2]))
    assert code == 2 and "not an ONNX model" in out


def test_not_onnx(tmp_path: Path) -> None:
    code, out = _inspect(_save_bytes(tmp_path / "n.onnx", b"this is a text file, not a model\n" * 10))
    assert code == 2 and "not an ONNX model" in out


def test_checker_failure(tmp_path: Path) -> None:
    model = _conv_bn_graph(constants=False)
    model.graph.node[0].input[1] = "undefined_weight"
    code, out = _inspect(_save(model, tmp_path / "bad.onnx"))
    assert code == 2 and "fails the ONNX checker" in out
    assert "Traceback" not in out


def _with_external(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    tensor = next(init for init in model.graph.initializer if init.name == "w")
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return model


def test_external_data_path_traversal(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 288)
    sub = tmp_path / "m"
    sub.mkdir()
    model = _with_external(_conv_bn_graph(constants=False), "../secret.bin")
    code, out = _inspect(_save(model, sub / "ext.onnx"))
    assert code == 2 and "outside the model's folder" in out


def test_external_data_missing(tmp_path: Path) -> None:
    model = _with_external(_conv_bn_graph(constants=False), "weights.bin")
    code, out = _inspect(_save(model, tmp_path / "ext.onnx"))
    assert code == 2 and "is missing" in out


def test_external_data_beside_model_loads(tmp_path: Path) -> None:
    model = _conv_bn_graph(constants=False)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)  # save_model moves the tensors of `model` out to the file
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    loaded = load_model(tmp_path / "ext.onnx")
    x = RNG.standard_normal((1, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(ort_run(loaded.model, x)[0], ort_run(reference, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [6, 22])
def test_opset_out_of_range(tmp_path: Path, opset: int) -> None:
    model = _conv_bn_graph(constants=False, opset=opset)
    if opset == 6:  # BatchNormalization-6 takes the old is_test attribute; the test is the opset
        model.graph.node[1].attribute.append(helper.make_attribute("is_test", 1))
    code, out = _inspect(_save(model, tmp_path / "o.onnx"))
    assert code == 2 and f"uses opset {opset}" in out and "supports opsets 11 to 21" in out


def _upsample_opset9() -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Upsample(x2, nearest) at opset 9: Upsample exists only before opset 10."""
    model = _conv_bn_graph(constants=False, opset=9)
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    model.graph.node[-1].output[0] = "r"
    model.graph.node.append(helper.make_node("Upsample", ["r", "scales"], ["y"], mode="nearest", name="up"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12]))
    model.metadata_props.add(key="onnxdgh.mean", value="0.5")
    return model


def test_old_opset_is_converted_and_checked(tmp_path: Path) -> None:
    """Opsets 7-10 are brought to 13 (Upsample -> Resize) and must compute what the file computes."""
    model = _upsample_opset9()
    path = _save(model, tmp_path / "up9.onnx")
    before = path.read_bytes()
    loaded = load_model(path)
    assert loaded.opset == 13 and loaded.canonicalisation["opset_converted_from"] == 9
    assert [n.op_type for n in loaded.model.graph.node].count("Resize") == 1
    assert loaded.metadata == {"onnxdgh.mean": "0.5"}
    x = RNG.standard_normal((1, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(ort_run(loaded.model, x)[0], ort_run(model, x)[0], rtol=1e-5, atol=1e-5)
    assert path.read_bytes() == before
    code, out = _inspect(path)
    assert "opset     13 (converted from 9)" in out


def test_old_opset_conversion_that_changes_outputs_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxdgh.load as load_module

    real = onnx.version_converter.convert_version

    def wrong(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
        converted = real(model, version)
        for tensor in converted.graph.initializer:
            if tensor.name == "bias":  # a converter bug stands in: the BN bias shifts
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + 1.0, "bias"))
        return converted

    monkeypatch.setattr(load_module.onnx.version_converter, "convert_version", wrong)
    path = _save(_upsample_opset9(), tmp_path / "up9.onnx")
    with pytest.raises(UnsupportedModelError, match="version converter changed its outputs"):
        load_model(path)


def test_old_opset_without_converter_adapter_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxdgh.load as load_module

    def missing_adapter(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
        raise RuntimeError("No Adapter For Upsample\n  from opset 9 to 10")

    monkeypatch.setattr(load_module.onnx.version_converter, "convert_version", missing_adapter)
    path = _save(_upsample_opset9(), tmp_path / "up9.onnx")
    with pytest.raises(UnsupportedModelError, match="cannot be converted to opset 13") as caught:
        load_model(path)
    assert "No Adapter For Upsample from opset 9 to 10" in str(caught.value)  # its lines joined on one
    code, out = _inspect(path)
    assert code == 2 and "re-export the model at opset 13" in out


def test_old_opset_conversion_that_onnxruntime_cannot_run_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxdgh.runtime as runtime_module

    def broken(model: onnx.ModelProto, **kwargs: object) -> object:
        raise RuntimeError("")  # an empty message: the error line names the type instead

    monkeypatch.setattr(runtime_module, "make_session", broken)
    path = _save(_upsample_opset9(), tmp_path / "up9.onnx")
    with pytest.raises(UnsupportedModelError, match=r"could not be checked in onnxruntime \(RuntimeError\)"):
        load_model(path)


def test_two_inputs(tmp_path: Path) -> None:
    code, out = _inspect(_save(_conv_bn_graph(constants=False, extra_input=True), tmp_path / "two.onnx"))
    assert code == 2 and "2 graph inputs" in out


def test_integer_input(tmp_path: Path) -> None:
    model = _conv_bn_graph(constants=False)
    model.graph.node.insert(0, helper.make_node("Cast", ["xi"], ["x"], to=TensorProto.FLOAT))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("xi", TensorProto.UINT8, [1, 2, 6, 6]))
    code, out = _inspect(_save(model, tmp_path / "u8.onnx"))
    assert code == 2 and "is not a float tensor" in out


def test_not_4d_input(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    code, out = _inspect(_save(model, tmp_path / "flat.onnx"))
    assert code == 2 and "rank 2" in out and "4-D" in out


# ------------------------------------------------------------------- canonicalisation


def _assert_same_function(original: onnx.ModelProto, canonical: onnx.ModelProto, shape: tuple[int, ...]) -> None:
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        for a, b in zip(ort_run(original, x), ort_run(canonical, x)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_torchscript_preserve_export_identity_bn_params(tmp_path: Path) -> None:
    module = settle_bn(TinyConvBnRelu(), (3, 12, 12))
    path = export_onnx(module, (3, 12, 12), tmp_path / "ts.onnx")
    original = onnx.load(str(path))
    assert any(node.op_type == "Identity" for node in original.graph.node), "exporter no longer emits Identity"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_model(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "input file was modified"
    assert not any(node.op_type == "Identity" for node in loaded.model.graph.node)
    assert len(loaded.bn_nodes) == 2 and all(bn.usable for bn in loaded.bn_nodes)
    torch_bn = [m for m in module.modules() if m.__class__.__name__ == "BatchNorm2d"]
    for info, bn in zip(loaded.bn_nodes, torch_bn):
        np.testing.assert_allclose(info.mean, bn.running_mean.numpy(), rtol=1e-6)
        np.testing.assert_allclose(info.var, bn.running_var.numpy(), rtol=1e-6)
    _assert_same_function(original, loaded.model, (2, 3, 12, 12))


def test_constant_node_weights_become_initializers() -> None:
    model = _conv_bn_graph(constants=True)
    loaded = load_model_proto(model)
    assert not any(node.op_type == "Constant" for node in loaded.model.graph.node)
    assert loaded.canonicalisation["constants_lifted"] == 5
    assert len(loaded.bn_nodes) == 1 and loaded.bn_nodes[0].usable
    _assert_same_function(model, loaded.model, (1, 2, 6, 6))


def test_dead_nodes_and_identity_output() -> None:
    model = _conv_bn_graph(constants=False)
    graph = model.graph
    graph.node.append(helper.make_node("Sigmoid", ["c"], ["unused"], name="dead"))
    graph.node.append(helper.make_node("Identity", ["y"], ["out"], name="id_out"))
    graph.output[0].name = "out"
    canonical, counts = canonicalise(model)
    assert counts["dead_nodes_removed"] == 1 and counts["identities_removed"] == 1
    assert [o.name for o in canonical.graph.output] == ["out"]
    assert {n.op_type for n in canonical.graph.node} == {"Conv", "BatchNormalization", "Relu"}
    _assert_same_function(model, canonical, (1, 2, 6, 6))
    assert len(model.graph.node) == 5, "canonicalise modified its input"


def test_bn_statistics_unusable_reported(tmp_path: Path) -> None:
    # Within -epsilon the BN still computes; below it load_model refuses (test_reliability).
    model = _conv_bn_graph(constants=False)
    for init in model.graph.initializer:
        if init.name == "var":
            init.CopyFrom(numpy_helper.from_array(np.array([1.0, -1e-6, 1.0, 1.0], np.float32), "var"))
    loaded = load_model_proto(model)
    assert not loaded.bn_nodes[0].usable and "negative" in (loaded.bn_nodes[0].problem or "")


def test_fixed_batch_recorded_and_made_dynamic(tmp_path: Path) -> None:
    class WithReshape(TinyConvBnRelu):
        def forward(self, x):  # noqa: ANN001, ANN201 - torch signature
            return self.head(self.pool(self.features(x)).reshape(1, -1))

    module = WithReshape()
    module.load_state_dict(settle_bn(TinyConvBnRelu(), (3, 12, 12)).state_dict())
    path = export_onnx(module, (3, 12, 12), tmp_path / "fixed.onnx", dynamic_batch=False)
    loaded = load_model(path)
    assert loaded.batch_fixed and loaded.batch_dim == 1
    dynamic = make_batch_dynamic(loaded)
    assert dynamic is not None
    x = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32)
    together = ort_run(dynamic, x)[0]
    alone = np.concatenate([ort_run(loaded.model, x[i : i + 1])[0] for i in range(4)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_metadata_normalization(tmp_path: Path) -> None:
    model = _conv_bn_graph(constants=False, input_shape=(1, 2, 6, 6))
    helper.set_model_props(model, {"input_mean": "[0.5, 0.25]", "input_std": "[0.5]"})
    norm = load_model_proto(model).input_normalization()
    assert norm is not None
    np.testing.assert_allclose(norm[0], [0.5, 0.25])
    np.testing.assert_allclose(norm[1], [0.5, 0.5])


def test_input_shape_pins_symbolic_dims(tmp_path: Path) -> None:
    model = _conv_bn_graph(constants=False, input_shape=(1, 2, 6, 6))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "h"
    dims[3].Clear()
    dims[3].dim_param = "w"
    model.graph.output[0].type.tensor_type.shape.Clear()
    for d in (1, 4, "h", "w"):
        dim = model.graph.output[0].type.tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    path = _save(model, tmp_path / "open.onnx")
    code, out = _inspect(path)
    assert code == 1 and "--input-shape" in out  # inspect's verdict: not ready until the size is pinned
    with pytest.raises(UnsupportedModelError, match="symbolic H dimension"):  # the loader itself refuses
        load_model(path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--input-shape", "2x6x8"])
    assert result.exit_code == 0, result.output
    assert load_model(path, input_shape=(2, 6, 8)).input_shape == (2, 6, 8)
    clash = CliRunner().invoke(main, ["inspect", str(path), "--input-shape", "3x6x8"])
    assert clash.exit_code == 2 and "has C = 2, not 3" in clash.output
    bad = CliRunner().invoke(main, ["inspect", str(path), "--input-shape", "6x8"])
    assert bad.exit_code == 2 and "is not C x H x W" in bad.output


# --------------------------------------------------------------------- shape folding

_SHAPE_OPS = {"Shape", "Size", "Cast", "Gather", "Unsqueeze", "Concat"}


def _reshape_by_shape(batch: str = "N", height: str = "4", target: str = "n64, rest", out: str = "N, 8") -> str:
    """Conv, pool, then a Reshape whose target an exporter computed from Shape (PaddleOCR style)."""
    return f"""
    <ir_version: 8, opset_import: ["" : 13]>
    reshape_by_shape (float[{batch}, 2, {height}, 4] x) => (float[{out}] y)
    <float[8, 2, 1, 1] w = {{1, -2, 3, 4, -5, 6, 7, 8, 9, 10, -11, 12, 13, 14, 15, -16}},
     int64[1] axes = {{0}}, int64 zero = {{0}}, int64 two = {{2}}, int64[1] rest = {{-1}}, int64[1] eight = {{8}}>
    {{
      c = Conv(x, w)
      p = GlobalAveragePool(c)
      s = Shape(x)
      s32 = Cast<to = 6>(s)
      n = Gather<axis = 0>(s32, zero)
      n1 = Unsqueeze(n, axes)
      n64 = Cast<to = 7>(n1)
      h = Gather<axis = 0>(s, two)
      h1 = Unsqueeze(h, axes)
      t = Concat<axis = 0>({target})
      y = Reshape(p, t)
    }}
    """


def _reshape_target(model: onnx.ModelProto) -> np.ndarray:
    inits = {init.name: init for init in model.graph.initializer}
    (reshape,) = [node for node in model.graph.node if node.op_type == "Reshape"]
    assert reshape.input[1] in inits, "the Reshape target is still computed"
    return numpy_helper.to_array(inits[reshape.input[1]])


@pytest.mark.parametrize(
    ("target", "expected"),
    [("n64, rest", [0, -1]), ("n64, eight", [0, 8])],
)
def test_shape_computed_reshape_target_folds_keeping_batch_dynamic(target: str, expected: list[int]) -> None:
    model = onnx.parser.parse_model(_reshape_by_shape(target=target))
    canonical, counts = canonicalise(model)
    assert counts["shape_values_folded"] == 1
    assert not _SHAPE_OPS & {node.op_type for node in canonical.graph.node}
    np.testing.assert_array_equal(_reshape_target(canonical), expected)  # batch entry: 0 (copy), never a fixed 1
    for batch in (1, 3):
        _assert_same_function(model, canonical, (batch, 2, 4, 4))


def test_shape_value_that_is_not_the_batch_becomes_minus_one() -> None:
    # Reshape to N*8 elements: the one entry changing with the batch is not the batch itself.
    text = _reshape_by_shape(out="N").replace("s = Shape(x)", "s = Shape(p)")
    text = text.replace("y = Reshape(p, t)", "size = Size(p)\n      total = Unsqueeze(size, axes)\n      y = Reshape(p, total)")
    model = onnx.parser.parse_model(text)
    canonical, counts = canonicalise(model)
    assert counts["shape_values_folded"] == 1
    np.testing.assert_array_equal(_reshape_target(canonical), [-1])
    for batch in (1, 3):
        _assert_same_function(model, canonical, (batch, 2, 4, 4))


def test_fixed_batch_shape_folds_and_can_still_be_made_dynamic() -> None:
    model = onnx.parser.parse_model(_reshape_by_shape(batch="1", out="1, 8"))
    loaded = load_model_proto(model)
    assert loaded.batch_fixed
    np.testing.assert_array_equal(_reshape_target(loaded.model), [1, -1])
    _assert_same_function(model, loaded.model, (1, 2, 4, 4))
    dynamic = make_batch_dynamic(loaded)  # the promise: a fixed-batch export still runs any batch
    assert dynamic is not None
    x = RNG.standard_normal((3, 2, 4, 4)).astype(np.float32)
    alone = np.concatenate([ort_run(model, x[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(ort_run(dynamic, x)[0], alone, rtol=1e-6, atol=1e-6)


def test_shape_of_an_unpinned_symbolic_dim_is_not_folded() -> None:
    # The target reads H, which nothing pins: it must stay computed.
    text = _reshape_by_shape(height="H", target="n64, h1, rest", out="N, H, 8")
    text = text.replace("c = Conv(x, w)", "c = Conv(x, w)\n      q = Transpose<perm = [0, 2, 1, 3]>(c)")
    text = text.replace("p = GlobalAveragePool(c)", "p = ReduceMean<axes = [3], keepdims = 1>(q)")
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    canonical, counts = canonicalise(model)
    assert counts["shape_values_folded"] == 0
    assert {"Shape", "Gather", "Concat"} <= {node.op_type for node in canonical.graph.node}
    for height in (4, 6):
        _assert_same_function(model, canonical, (2, 2, height, 4))
    pinned = load_model_proto(model, input_shape=(2, 6, 4))  # once pinned, the same value is a constant
    np.testing.assert_array_equal(_reshape_target(pinned.model), [0, 6, -1])
    _assert_same_function(model, pinned.model, (3, 2, 6, 4))


def test_atomic_write_uses_normal_file_mode(tmp_path: Path) -> None:
    import os

    from onnxdgh.fileio import atomic_write_bytes

    out = atomic_write_bytes(tmp_path / "x.bin", b"abc")
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert out.read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"], "temporary file left behind"


def test_the_model_as_written_is_kept_only_when_asked(tiny_model_path: Path) -> None:
    # A second copy of every weight: only the validator, which checks the file as written, asks.
    assert load_model(tiny_model_path).as_written is None
    kept = load_model(tiny_model_path, keep_as_written=True).as_written
    assert kept is not None and kept == onnx.load(str(tiny_model_path))
    assert load_model_proto(onnx.load(str(tiny_model_path)), keep_as_written=True).as_written is not None

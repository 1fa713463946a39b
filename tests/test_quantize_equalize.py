"""Cross-layer equalization: same float function (onnxruntime), equal ranges, the ReLU6 rule, skipped pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnxdgh import QuantizeConfig, quantize
from onnxdgh import graph as g
from onnxdgh.cli import main
from onnxdgh.fileio import save_images_npz
from onnxdgh.quantization.equalize import equalize, input_bounds_from_normalization

from .helpers_quantize import conv_weight, images, make_model, rng, run

N = helper.make_node


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return g.to_array(g.initializer_map(model.graph)[name])


def _same_function(before: onnx.ModelProto, after: onnx.ModelProto, x: np.ndarray) -> None:
    for a, b in zip(run(before, x), run(after, x)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def _spread_weights(out_ch: int, in_ch: int, k: int, seed: int, spread: float = 50.0) -> np.ndarray:
    """Weights whose per-output-channel ranges differ by up to ``spread``."""
    w = rng(seed).standard_normal((out_ch, in_ch, k, k)).astype(np.float32)
    return w * np.geomspace(1.0, spread, out_ch).astype(np.float32).reshape(-1, 1, 1, 1)


def _chain(middle: list[onnx.NodeProto], inits_extra: dict[str, np.ndarray] | None = None, *,
           depthwise: bool = False, w1: np.ndarray | None = None) -> onnx.ModelProto:
    """x -> conv0 (6 ch) -> middle (reads c0, writes h) -> conv1 -> y."""
    w1 = _spread_weights(6, 3, 3, 1) if w1 is None else w1
    if depthwise:
        second = N("Conv", ["h", "w2", "b2"], ["y"], name="conv1", group=6, pads=[1, 1, 1, 1])
        w2 = rng(2).standard_normal((6, 1, 3, 3)).astype(np.float32)
        b2 = np.linspace(-0.5, 0.5, 6).astype(np.float32)
    else:
        second = N("Conv", ["h", "w2", "b2"], ["y"], name="conv1")
        w2 = rng(2).standard_normal((4, 6, 1, 1)).astype(np.float32)
        b2 = np.linspace(-0.5, 0.5, 4).astype(np.float32)
    nodes = [N("Conv", ["x", "w1", "b1"], ["c0"], name="conv0", pads=[1, 1, 1, 1]), *middle, second]
    inits = {"w1": w1, "b1": np.linspace(-1, 1, 6).astype(np.float32), "w2": w2, "b2": b2}
    return make_model(nodes, inits | (inits_extra or {}))


def _ranges(model: onnx.ModelProto, group2: int = 1) -> tuple[np.ndarray, np.ndarray]:
    w1, w2 = _array(model, "w1"), _array(model, "w2")
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = np.abs(w2).max(axis=(0, 2, 3)) if group2 == 1 else np.abs(w2).reshape(w2.shape[0], -1).max(axis=1)
    return r1, r2


@pytest.mark.parametrize("depthwise", [False, True])
def test_relu_pair_keeps_the_function_and_equalizes_ranges(depthwise: bool) -> None:
    model = _chain([N("Relu", ["c0"], ["h"])], depthwise=depthwise)
    equalized, report = equalize(model, power_of_two=False)
    _same_function(model, equalized, images(4))
    assert [(p["first"], p["second"], p["via"]) for p in report.pairs] == [("conv0", "conv1", ["Relu"])]
    r1, r2 = _ranges(equalized, 6 if depthwise else 1)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # the paper's fixed point: both ranges sqrt(r1 r2)
    before1, before2 = _ranges(model, 6 if depthwise else 1)
    np.testing.assert_allclose(r1, np.sqrt(before1 * before2), rtol=1e-5)
    assert report.sweeps <= 2  # one pair converges in one sweep (the second confirms)


def test_power_of_two_scales_move_only_exponents() -> None:
    model = _chain([N("Relu", ["c0"], ["r"]), N("Pad", ["r", "pads"], ["p"]),
                    N("MaxPool", ["p"], ["h"], kernel_shape=[2, 2])], {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)})
    equalized, report = equalize(model, power_of_two=True)
    _same_function(model, equalized, images(4))
    assert report.pairs[0]["via"] == ["Relu", "Pad", "MaxPool"]
    ratio = _array(model, "w1")[:, 0, 0, 0] / _array(equalized, "w1")[:, 0, 0, 0]
    np.testing.assert_allclose(np.log2(ratio), np.round(np.log2(ratio)), atol=1e-6)
    r1, r2 = _ranges(equalized)
    assert np.all(r1 / r2 <= 2.0 + 1e-6) and np.all(r2 / r1 <= 2.0 + 1e-6)  # equal within one rounding
    assert np.ptp(np.log2(r1)) < np.ptp(np.log2(_ranges(model)[0]))


def test_relu6_scales_only_channels_that_provably_never_clip() -> None:
    # conv0 channels 0-2 are tiny (|x| <= 1 in, sum |w| small: never reach 6), 3-5 large (may clip).
    w1 = rng(3).standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.02
    w1[3:] *= 100.0
    clip = N("Clip", ["c0", "lo", "hi"], ["h"], name="relu6")
    bounds = {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    model = _chain([clip], bounds, w1=w1)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "b1"))
    g.add_initializer(model.graph, "b1", np.array([0.1, -0.1, 0.2, 1.0, 2.0, -1.0], np.float32))
    box = input_bounds_from_normalization(np.full(3, 0.5), np.full(3, 0.5))  # inputs in [-1, 1]
    equalized, report = equalize(model, power_of_two=False, input_bounds=box)
    (pair,) = report.pairs
    assert pair["clip_bound"] == 6.0 and pair["limited"] >= 3
    ratio = _array(model, "w1").reshape(6, -1)[:, 0] / _array(equalized, "w1").reshape(6, -1)[:, 0]
    np.testing.assert_allclose(ratio[3:], 1.0)  # may clip: untouched
    assert np.all(ratio[:3] < 1.0)  # tiny channels were scaled up ...
    assert _array(equalized, "hi") == 6.0  # ... under the unchanged ReLU6 bound
    # Exact also where the large channels saturate at 6 (inputs at the corners of the box).
    x = np.sign(images(8)).astype(np.float32)
    _same_function(model, equalized, x)
    # Without a bound on the input nothing can be proven: the pair changes nothing.
    untouched, report = equalize(model, power_of_two=False)
    np.testing.assert_array_equal(_array(untouched, "w1"), _array(model, "w1"))
    assert report.pairs[0]["limited"] == 6


@pytest.mark.parametrize(
    ("middle", "extra", "fragment"),
    [
        ([N("Sigmoid", ["c0"], ["h"])], {}, "Sigmoid"),
        ([N("Clip", ["c0", "lo", "hi"], ["h"])], {"lo": np.array(-1.0, np.float32), "hi": np.array(1.0, np.float32)},
         "lower bound"),
        ([N("Relu", ["c0"], ["r"]), N("Pad", ["r", "pads", "v"], ["h"])],
         {"pads": np.zeros(8, np.int64), "v": np.array(1.0, np.float32)}, "value other than 0"),
    ],
)
def test_non_homogeneous_ops_are_skipped(middle: list[onnx.NodeProto], extra: dict[str, np.ndarray], fragment: str) -> None:
    model = _chain(middle, extra)
    equalized, report = equalize(model)
    assert report.pairs == []
    assert any(item["node"] == "conv0" and fragment in item["reason"] for item in report.skipped), report.skipped
    np.testing.assert_array_equal(_array(equalized, "w1"), _array(model, "w1"))


def test_a_tensor_with_two_readers_is_skipped() -> None:
    nodes = [
        N("Conv", ["x", "w1", "b1"], ["c0"], name="conv0"),
        N("Relu", ["c0"], ["h"]),
        N("Conv", ["h", "w2"], ["y"], name="conv1"),
        N("Conv", ["h", "w3"], ["z"], name="conv2"),
    ]
    inits = {"w1": _spread_weights(6, 3, 1, 1), "b1": np.zeros(6, np.float32),
             "w2": conv_weight(4, 6, 1), "w3": conv_weight(4, 6, 1, seed=5)}
    model = make_model(nodes, inits, outputs=("y", "z"))
    equalized, report = equalize(model)
    assert report.pairs == [] and "read by 2 nodes" in report.skipped[0]["reason"]
    _same_function(model, equalized, images(2))


def test_shared_weight_is_skipped() -> None:
    nodes = [N("Conv", ["x", "w1"], ["c0"], name="conv0"), N("Relu", ["c0"], ["h"]),
             N("Conv", ["h", "w2"], ["y"], name="conv1"), N("Conv", ["x", "w1"], ["z"], name="conv2")]
    model = make_model(nodes, {"w1": _spread_weights(6, 3, 1, 1), "w2": conv_weight(4, 6, 1)}, outputs=("y", "z"))
    _, report = equalize(model)
    assert report.pairs == [] and any("shared" in item["reason"] for item in report.skipped)


def test_quantize_with_equalize_reports_pairs(tmp_path: Path) -> None:
    model = _chain([N("Relu", ["c0"], ["h"])], depthwise=True)
    x = images(16, seed=4)
    result = quantize(model_path := _save(model, tmp_path), x, QuantizeConfig(equalize=True))
    assert result.report["config"]["equalize"] is True
    assert [p["first"] for p in result.report["equalize"]["pairs"]] == ["conv0"]
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["onnxdgh.equalize"] == "true"
    plain = quantize(model_path, x, QuantizeConfig(equalize=False))
    assert "equalize" not in plain.report

    def error(q: onnx.ModelProto) -> float:
        return float(np.mean((run(q, x)[0] - run(model, x)[0]) ** 2))

    # The ranges of conv0's channels differ 50x: equalized, the shared activation grid serves all.
    assert error(result.model) < error(plain.model)


def test_cli_equalize_flag(tmp_path: Path) -> None:
    model_path = _save(_chain([N("Relu", ["c0"], ["h"])]), tmp_path)
    calib = save_images_npz(tmp_path / "calib.npz", images(8), {"source": "test"})
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(model_path), "-o", str(out), "--calib-data", str(calib),
                                       "--equalize", "--no-validate", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "equalize  1 layer pair(s)" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["config"]["equalize"] is True


def test_equalize_must_be_a_bool() -> None:
    from onnxdgh.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="equalize"):
        QuantizeConfig(equalize="yes")  # type: ignore[arg-type]


def _save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path

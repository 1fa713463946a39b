"""Recurrent layers (LSTM, GRU, RNN) are out of scope: one clear reason naming the node, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxdgh import QuantizeConfig, load_model_proto, quantize
from onnxdgh.cli import main
from onnxdgh.errors import UnsupportedModelError

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(op: str, hidden: int = 3, channels: int = 4, steps: int = 6) -> onnx.ModelProto:
    """Conv (4 x 1 kernel) -> Squeeze -> time-major Transpose -> ``op`` named ``encoder_rnn``: a CRNN's shape."""
    rng = np.random.default_rng(0)
    gates = GATES[op]
    inits = {"w1": rng.normal(0, 0.5, (channels, 1, 4, 1)), "b1": np.zeros(channels), "axes": np.array([2], np.int64),
             "W": rng.normal(0, 0.5, (1, gates * hidden, channels)), "R": rng.normal(0, 0.5, (1, gates * hidden, hidden))}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Squeeze", ["c1", "axes"], ["sq"], name="squeeze"),
             helper.make_node("Transpose", ["sq"], ["tr"], name="to_time_major", perm=[2, 0, 1]),
             helper.make_node(op, ["tr", "W", "R"], ["Y"], name="encoder_rnn", hidden_size=hidden)]
    graph = helper.make_graph(
        nodes, "crnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, steps])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [steps, 1, "batch", hidden])],
        [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("op", sorted(GATES))
def test_quantize_refuses_a_recurrent_node_by_name(op: str, tmp_path: Path) -> None:
    path, out = tmp_path / "crnn.onnx", tmp_path / "q.onnx"
    onnx.save(recurrent_model(op), path)
    before = path.read_bytes()
    # No --preprocess: the recurrent node is the reason given, not the unknown normalisation.
    result = CliRunner().invoke(main, ["quantize", str(path), "-o", str(out)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == (f"error: node 'encoder_rnn' is {'a' if op == 'GRU' else 'an'} {op}: recurrent layers "
                        "(LSTM, GRU, RNN) are out of onnxdgh's scope")
    assert len(lines) == 2 and lines[1].startswith("hint: ") and "Traceback" not in result.output
    assert not out.exists() and path.read_bytes() == before


def test_the_library_refuses_it_before_calibrating() -> None:
    model = load_model_proto(recurrent_model("LSTM"), source="crnn")
    with pytest.raises(UnsupportedModelError, match="node 'encoder_rnn' is an LSTM") as info:
        quantize(model, np.zeros((8, 1, 4, 6), np.float32), QuantizeConfig(), progress=False)
    assert "extract_model" in info.value.hint


def test_inspect_says_not_ready_naming_the_node(tmp_path: Path) -> None:
    path = tmp_path / "crnn.onnx"
    onnx.save(recurrent_model("LSTM"), path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and "NOT READY" in result.stdout
    assert "the quantizer would refuse the model: node 'encoder_rnn' is an LSTM" in result.stdout

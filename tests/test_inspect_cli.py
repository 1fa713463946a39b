"""`onnxdgh inspect` and the CLI conventions shared by every command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from onnxdgh.cli import main

from .conftest import TinyConvBnRelu, export_onnx, settle_bn


def test_inspect_ready_json(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["inspect", str(tiny_model_path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "READY" in result.output
    report = json.loads(out.read_text())
    assert report["ready"] is True
    assert report["op_histogram"]["BatchNormalization"] == 2
    assert len(report["batch_norms"]) == 2 and all(bn["usable"] for bn in report["batch_norms"])
    assert report["inputs"][0]["shape"][1:] == [3, 12, 12]


def test_inspect_json_stdout(tiny_model_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tiny_model_path), "--json", "-"])
    assert result.exit_code == 0
    assert json.loads(result.output)["ready"] is True


def test_inspect_folded_bn_is_ready_with_the_fallback(tmp_path: Path) -> None:
    module = settle_bn(TinyConvBnRelu(), (3, 12, 12))
    path = export_onnx(module, (3, 12, 12), tmp_path / "folded.onnx", keep_bn=False)
    result = CliRunner().invoke(main, ["inspect", str(path), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["bn_folded"] is True and report["ready"] is True
    assert report["generation"].startswith("generation: procedural")
    assert any("TrainingMode.PRESERVE" in tip for tip in report["advice"])
    assert any("--preprocess" in tip for tip in report["advice"])  # no metadata, no BN: nothing to infer from
    text = CliRunner().invoke(main, ["inspect", str(path)])
    assert text.exit_code == 0 and "READY" in text.output and "method    generation: procedural" in text.output


def test_inspect_names_dgh_for_a_bn_model(tiny_model_path: Path) -> None:
    report = json.loads(CliRunner().invoke(main, ["inspect", str(tiny_model_path), "--json", "-"]).output)
    assert report["generation"].startswith("generation: dgh on 2 BN layer(s)")


def test_inspect_reports_unconvertible_op(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Hardmax", ["r"], ["y"], axis=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    path = tmp_path / "hm.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    result = CliRunner().invoke(main, ["inspect", str(path), "--json", "-"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert [item["op_type"] for item in report["unconvertible_ops"]] == ["Hardmax"]


def test_unknown_option_is_usage_error(tiny_model_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tiny_model_path), "--bogus"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_json_output_folder_missing(tiny_model_path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tiny_model_path), "--json", str(tmp_path / "no" / "r.json")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_python_dash_m_entry_point(tiny_model_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "onnxdgh", "inspect", str(tiny_model_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "READY" in proc.stdout

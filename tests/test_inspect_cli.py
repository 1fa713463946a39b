"""`onnxdgh inspect` and the CLI conventions shared by every command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
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


class _Sine(TinyConvBnRelu):
    """The tiny classifier with a Sin on its scores, which onnx2torch converts but the quantizer has no rule for."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        return super().forward(x).sin()


def test_inspect_dry_runs_the_quantizer_sin_not_ready(tmp_path: Path) -> None:
    path = export_onnx(settle_bn(_Sine(), (3, 12, 12)), (3, 12, 12), tmp_path / "sin.onnx")
    result = CliRunner().invoke(main, ["inspect", str(path), "--json", "-"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["ready"] is False and report["unconvertible_ops"] == []
    assert report["quantizer"]["ok"] is False
    sin_node = next(node for node in onnx.load(str(path)).graph.node if node.op_type == "Sin")
    reason = next(r for r in report["reasons"] if "quantizer" in r)
    assert "Sin" in reason and sin_node.name in reason
    text = CliRunner().invoke(main, ["inspect", str(path)])
    assert text.exit_code == 1 and "NOT READY" in text.output and "dry run" in text.output


def test_inspect_dry_run_counts_on_a_ready_model(tiny_model_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tiny_model_path), "--json", "-"])
    dry = json.loads(result.stdout)["quantizer"]
    assert dry["ok"] is True and dry["profile"] == "generic-pot-int8" and dry["activations"] > 0


class _Gated(TinyConvBnRelu):
    """The tiny classifier with a Sigmoid on its scores: generic-pot-int8 allows Sigmoid, strict-pot-int8 does not."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        return super().forward(x).sigmoid()


def test_inspect_dry_run_follows_the_profile(tmp_path: Path) -> None:
    path = export_onnx(settle_bn(_Gated(), (3, 12, 12)), (3, 12, 12), tmp_path / "gated.onnx")
    generic = CliRunner().invoke(main, ["inspect", str(path), "--json", "-"])
    assert generic.exit_code == 0, generic.output
    strict = CliRunner().invoke(main, ["inspect", str(path), "--profile", "strict-pot-int8", "--json", "-"])
    assert strict.exit_code == 1, strict.output
    report = json.loads(strict.stdout)
    assert report["quantizer"]["profile"] == "strict-pot-int8" and report["quantizer"]["ok"] is False
    assert "Sigmoid" in report["quantizer"]["error"] and "strict-pot-int8" in report["quantizer"]["error"]
    assert any("--profile" in tip for tip in report["advice"])


def test_inspect_bad_profile_is_bad_input(tiny_model_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tiny_model_path), "--profile", "no-such-npu"])
    assert result.exit_code == 2 and "unknown profile" in result.output


def _symbolic_model(tmp_path: Path) -> Path:
    path = export_onnx(settle_bn(TinyConvBnRelu(), (3, 12, 12)), (3, 12, 12), tmp_path / "sym.onnx")
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "height"
    dims[3].Clear()
    dims[3].dim_param = "width"
    path.write_bytes(model.SerializeToString())
    return path


def test_inspect_symbolic_height_width_is_a_verdict(tmp_path: Path) -> None:
    path = _symbolic_model(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--json", "-"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["ready"] is False and "symbolic" in report["reasons"][0]
    assert any("--input-shape" in tip for tip in report["advice"])
    assert report["inputs"][0]["shape"][2:] == ["height", "width"]
    text = CliRunner().invoke(main, ["inspect", str(path)])
    assert text.exit_code == 1 and "NOT READY" in text.output and "--input-shape" in text.output
    pinned = CliRunner().invoke(main, ["inspect", str(path), "--input-shape", "3x12x12"])
    assert pinned.exit_code == 0 and "READY" in pinned.output

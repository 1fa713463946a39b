"""``onnxdgh validate``: exit codes 0/1/2, the table, JSON to a file and to stdout, --list-profiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxdgh.cli import main

from .helpers_validate import float_model, images, quantized_model, set_init


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("validate_cli")
    reference = float_model()
    good = quantized_model(reference)
    bad = quantized_model(reference)
    set_init(bad, "logits_scale", np.array(0.1, np.float32))
    paths = {
        "float": folder / "model.onnx",
        "good": folder / "model_q.onnx",
        "bad": folder / "bad_q.onnx",
        "data": folder / "images.npz",
        "labels": folder / "labels.npy",
        "short_labels": folder / "short.npy",
        "pickled": folder / "pickled.npy",
    }
    onnx.save(reference, paths["float"])
    onnx.save(good, paths["good"])
    onnx.save(bad, paths["bad"])
    np.savez(paths["data"], images=images(20, seed=2))
    np.save(paths["labels"], np.arange(20) % 4)
    np.save(paths["short_labels"], np.arange(5))
    np.save(paths["pickled"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return paths


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_pass_writes_table_and_json(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code, stdout, _ = run("validate", files["good"], "--reference", files["float"], "--data", files["data"],
                          "--labels", files["labels"], "--min-sqnr", 15, "--min-agreement", 0.5, "--json", out)
    assert code == 0
    assert "verdict     PASS" in stdout and "Worst layers" in stdout and "no violations" in stdout
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["violations"] == []
    assert report["data"] == {"source": "given", "count": 20, "labelled": True, "description": "20 given images"}
    assert isinstance(report["outputs"][0]["sqnr_db"], float) and report["outputs"][0]["float_accuracy"] is not None
    assert [g["gate"] for g in report["gates"]] == ["min-sqnr", "min-agreement"]
    # The table shows the same worst layer as the JSON.
    assert report["layers"][0]["tensor"] in stdout.split("Worst layers")[1].splitlines()[2]


def test_violations_exit_1_and_json_to_stdout(files: dict[str, Path]) -> None:
    code, stdout, _ = run("validate", files["bad"], "--json", "-")
    assert code == 1
    report = json.loads(stdout)
    assert report["passed"] is False
    assert report["violation_counts"] == {"scale-not-power-of-two": 2}
    assert {v["node"] for v in report["violations"]} == {"logits_QuantizeLinear", "logits_DequantizeLinear"}


def test_violations_table(files: dict[str, Path]) -> None:
    code, stdout, _ = run("validate", files["bad"])
    assert code == 1
    assert "scale-not-power-of-two" in stdout and "logits_QuantizeLinear" in stdout and "FAIL" in stdout


def test_gate_below_threshold_exits_1(files: dict[str, Path]) -> None:
    code, stdout, _ = run("validate", files["good"], "-r", files["float"], "--random-images", 8, "--min-sqnr", 200)
    assert code == 1
    assert "FAIL  SQNR of logits" in stdout and "1 gate(s) failed" in stdout


def test_strict_profile_rejects_per_channel_weights(files: dict[str, Path]) -> None:
    code, stdout, _ = run("validate", files["good"], "--profile", "strict-pot-int8")
    assert code == 1 and "per-channel-weights" in stdout


def test_profile_from_file(files: dict[str, Path], tmp_path: Path) -> None:
    from onnxdgh.profile import load_profile

    data = load_profile("generic-pot-int8").to_dict()
    data["name"] = "no-flatten"
    data["allowed_ops"].remove("Flatten")
    path = tmp_path / "target.json"
    path.write_text(json.dumps(data))
    code, stdout, _ = run("validate", files["good"], "--profile", path)
    assert code == 1 and "op-not-allowed" in stdout and "no-flatten" in stdout


def test_list_profiles() -> None:
    code, stdout, _ = run("validate", "--list-profiles")
    assert code == 0
    for name in ("generic-pot-int8", "strict-pot-int8", "pot-w4a8", "pot-lowbit"):
        assert name in stdout
    assert "(default)" in stdout


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["{tmp}/missing.onnx"], "does not exist"),
        (["{good}", "--profile", "nope"], "unknown profile"),
        (["{good}", "--profile", "{tmp}/absent.json"], "does not exist"),
        (["{good}", "-r", "{float}", "--data", "{tmp}/none.npz"], "does not exist"),
        (["{good}", "-r", "{float}", "--data", "{labels}"], "shape"),
        (["{good}", "-r", "{float}", "--data", "{data}", "--labels", "{short_labels}"], "one label per image"),
        (["{good}", "-r", "{float}", "--data", "{data}", "--labels", "{pickled}"], "pickled"),
        (["{good}", "-r", "{float}", "--min-agreement", "2"], "between 0 and 1"),
        (["{good}", "--min-sqnr", "20"], "reference"),
        (["{good}", "--json", "{tmp}/no/such/folder/r.json"], "does not exist"),
        (["{good}", "--json", "{good}"], "never overwrites"),
    ],
)
def test_bad_input_exits_2(files: dict[str, Path], tmp_path: Path, args: list[str], pattern: str) -> None:
    names = {key: str(value) for key, value in files.items()}
    filled = [a.format(tmp=tmp_path, **names) for a in args]
    before = files["good"].read_bytes()
    code, stdout, stderr = run("validate", *filled)
    assert code == 2, stdout + stderr
    assert "error:" in stderr and pattern in stderr and "hint:" in stderr
    assert "Traceback" not in stderr + stdout
    assert files["good"].read_bytes() == before


def test_no_model_is_a_usage_error() -> None:
    code, _, stderr = run("validate")
    assert code == 2 and "MODEL" in stderr


def test_quiet_pass_prints_nothing(files: dict[str, Path]) -> None:
    code, stdout, _ = run("-q", "validate", files["good"])
    assert code == 0 and stdout == ""


def _floor_profile(tmp_path: Path, sqnr: float | None, agreement: float | None = None) -> Path:
    from onnxdgh.profile import load_profile

    data = load_profile("generic-pot-int8").to_dict()
    data.update(name="high-floor", min_output_sqnr_db=sqnr, min_top1_agreement=agreement)
    path = tmp_path / "floor.json"
    path.write_text(json.dumps(data))
    return path


def test_profile_floors_gate_with_a_reference(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    code, _, _ = run("validate", files["good"], "-r", files["float"], "--data", files["data"], "--json", out)
    assert code == 0
    report = json.loads(out.read_text())
    from onnxdgh.profile import load_profile

    generic = load_profile("generic-pot-int8")
    assert [(g["gate"], g["threshold"], g["origin"]) for g in report["gates"]] == [
        ("min-sqnr", generic.min_output_sqnr_db, "profile"), ("min-agreement", generic.min_top1_agreement, "profile")]
    assert report["profile"]["min_output_sqnr_db"] == generic.min_output_sqnr_db
    # On random images only the SQNR floor applies: their scores are near ties.
    code, stdout, _ = run("validate", files["good"], "-r", files["float"], "--random-images", 8, "--json", "-")
    assert code == 0 and [g["gate"] for g in json.loads(stdout)["gates"]] == ["min-sqnr"]
    code, stdout, _ = run("validate", files["good"], "-r", files["float"], "--random-images", 8,
                          "--min-agreement", 0.5, "--json", "-")
    assert [(g["gate"], g["origin"]) for g in json.loads(stdout)["gates"]] == [("min-sqnr", "profile"),
                                                                              ("min-agreement", "option")]
    # Without a reference there is nothing to measure, so no floor applies.
    code, stdout, _ = run("validate", files["good"], "--json", "-")
    assert code == 0 and json.loads(stdout)["gates"] == []


def test_below_the_profile_floor_exits_1_naming_output_value_floor_and_worst_layers(
    files: dict[str, Path], tmp_path: Path
) -> None:
    code, stdout, stderr = run("validate", files["good"], "-r", files["float"], "--data", files["data"],
                               "--profile", _floor_profile(tmp_path, 200.0))
    assert code == 1
    assert "FAIL  SQNR of logits" in stdout and "profile floor" in stdout
    line = next(text for text in stderr.splitlines() if "output 'logits'" in text)
    report_value = f"{float(line.split('SQNR ')[1].split(' dB')[0]):.2f}"
    assert f"SQNR {report_value} dB, below 200 dB (the floor of profile high-floor)" in line
    assert "on 20 given images" in line
    worst = line.split("worst layers: ")[1].split(", ")
    assert len(worst) == 3 and all(" dB)" in item for item in worst)
    hint = next(text for text in stderr.splitlines() if text.startswith("hint:"))
    assert "--min-sqnr" in hint and "--data" not in hint  # images were given
    # On random images the hint says how to measure on better ones.
    _, _, stderr = run("validate", files["good"], "-r", files["float"], "--random-images", 8,
                       "--profile", _floor_profile(tmp_path, 200.0))
    assert "--data" in next(text for text in stderr.splitlines() if text.startswith("hint:"))


def test_a_user_gate_replaces_the_floor(files: dict[str, Path], tmp_path: Path) -> None:
    profile = _floor_profile(tmp_path, 200.0, 0.99)
    code, stdout, _ = run("validate", files["good"], "-r", files["float"], "--data", files["data"],
                          "--profile", profile, "--min-sqnr", 10, "--min-agreement", 0.5, "--json", "-")
    assert code == 0
    gates = json.loads(stdout)["gates"]
    assert [(g["threshold"], g["origin"]) for g in gates] == [(10.0, "option"), (0.5, "option")]


def test_report_records_the_sha256_of_both_models(files: dict[str, Path]) -> None:
    import hashlib

    code, stdout, _ = run("validate", files["good"], "-r", files["float"], "--random-images", 4, "--json", "-")
    report = json.loads(stdout)
    assert report["model_sha256"] == hashlib.sha256(files["good"].read_bytes()).hexdigest()
    assert report["reference_sha256"] == hashlib.sha256(files["float"].read_bytes()).hexdigest()
    table = run("validate", files["good"], "-r", files["float"], "--random-images", 4)[1]
    assert report["model_sha256"] in table


def _edited(files: dict[str, Path], tmp_path: Path, edit: str) -> Path:
    """The good quantized model with one float node inserted the way a hand edit or a
    converter would leave it; the file is saved as is (no canonicalisation)."""
    model = onnx.load(files["good"])
    graph = model.graph
    if edit == "identity":  # DQ -> Identity -> MaxPool
        graph.node.append(onnx.helper.make_node("Identity", ["relu_out_dq"], ["relu_out_dq_copy"], name="inserted_identity"))
        next(node for node in graph.node if node.name == "pool").input[0] = "relu_out_dq_copy"
    elif edit == "constant":  # a float Constant as the Gemm's bias
        value = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "bias")
        graph.node.append(onnx.helper.make_node("Constant", [], ["float_bias"], name="inserted_constant", value=value))
        next(node for node in graph.node if node.name == "fc").input[2] = "float_bias"
    else:  # a Constant node holding a Q/DQ scale: a constant like an initializer
        value = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(
            next(init for init in graph.initializer if init.name == "relu_out_scale")), "scale")
        graph.node.append(onnx.helper.make_node("Constant", [], ["relu_scale_node"], name="scale_constant", value=value))
        for node in graph.node:
            if node.name in ("relu_out_QuantizeLinear", "relu_out_DequantizeLinear"):
                node.input[1] = "relu_scale_node"
    from onnxdgh import graph as g

    g.topological_sort(graph)
    path = tmp_path / f"{edit}_q.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(("edit", "node"), [("identity", "inserted_identity"), ("constant", "inserted_constant")])
def test_validate_reads_the_file_as_written(files: dict[str, Path], tmp_path: Path, edit: str, node: str) -> None:
    """An Identity or a float Constant left in the shipped graph runs in float: the loader's
    canonicalisation must not hide it from the rules."""
    code, stdout, _ = run("validate", _edited(files, tmp_path, edit), "--json", "-")
    assert code == 1
    report = json.loads(stdout)
    assert node in {v["node"] for v in report["violations"]}
    assert any(node in v["message"] for v in report["violations"] if v["rule"] == "float-input-not-dequantized")


def test_a_constant_node_scale_is_a_constant(files: dict[str, Path], tmp_path: Path) -> None:
    code, stdout, _ = run("validate", _edited(files, tmp_path, "scale"), "--json", "-")
    report = json.loads(stdout)
    assert [v for v in report["violations"] if v["rule"] != "op-not-allowed"] == []
    assert {v["node"] for v in report["violations"]} == {"scale_constant"}
    assert code == 1

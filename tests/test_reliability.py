"""Hostile inputs (issue 17): each test reproduces one defect an audit found, then pins the fix.

Every refusal is one ``error:`` line plus a ``hint:`` (none for an interrupt), a documented
exit code (2 bad input, 1 check failed, 130 interrupted), no traceback, no partial output
and no modified input.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from onnxdgh import load_model, load_model_proto
from onnxdgh.cli import main
from onnxdgh.errors import CalibrationDataError, InvalidInputError, ModelLoadError, OutputPathError
from onnxdgh.fileio import atomic_write_bytes, load_images_npz, save_images_npz
from onnxdgh.generation import GenerateConfig, StepInfo, generate

from .conftest import TinyConvBnRelu, export_onnx, settle_bn

QUICK = ["--images", "8", "--iterations", "2", "--batch-size", "4"]  # quantize needs 8: it holds back 20 %, at least 4


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["-q", *args])


def _assert_refused(result: Result, code: int, *fragments: str) -> None:
    """A clean refusal: the exit code, each fragment in the output, a hint, no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "error: " in result.output and "hint: " in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def _conv_bn(*, shape: tuple[int, int, int, int] = (1, 2, 6, 6), var: np.ndarray | None = None,
             weight: np.ndarray | None = None) -> onnx.ModelProto:
    """Conv -> BN -> Relu built in the test (initializers named w, scale, bias, mean, var)."""
    rng = np.random.default_rng(0)
    channels = shape[1]
    params = {
        "w": weight if weight is not None else rng.standard_normal((4, channels, 3, 3)).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "bias": rng.standard_normal(4).astype(np.float32),
        "mean": rng.standard_normal(4).astype(np.float32),
        "var": var if var is not None else rng.uniform(0.5, 2.0, 4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], 4, shape[2], shape[3]])],
        [numpy_helper.from_array(value, name) for name, value in params.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))
    return model


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    images = np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32)
    return save_images_npz(tmp_path / "calib.npz", images)


# ------------------------------------------ 1. one path-clash check, on resolved paths


@pytest.mark.parametrize("option", ["--json", "--preview", "--checkpoint"])
def test_generate_refuses_an_output_named_twice_in_another_spelling(
    tiny_model_path: Path, tmp_path: Path, option: str
) -> None:
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "g1.npz"
    alias = f"{tmp_path}/out/../out/./g1.npz"
    result = _cli("generate", str(tiny_model_path), "-o", str(output), option, alias, *QUICK)
    _assert_refused(result, 2, "same file", option, "-o")
    assert not output.exists()


def test_generate_refuses_an_output_that_is_a_symlink_to_another(tiny_model_path: Path, tmp_path: Path) -> None:
    output = tmp_path / "g1.npz"
    (tmp_path / "report.json").symlink_to(output)
    result = _cli("generate", str(tiny_model_path), "-o", str(output), "--json", str(tmp_path / "report.json"), *QUICK)
    _assert_refused(result, 2, "same file")
    assert not output.exists()


def test_an_output_hard_linked_to_the_input_is_refused_naming_the_option(tiny_model_path: Path, tmp_path: Path) -> None:
    link = tmp_path / "hard.json"
    os.link(tiny_model_path, link)
    before = tiny_model_path.read_bytes()
    result = _cli("inspect", str(tiny_model_path), "--json", str(link))
    _assert_refused(result, 2, "--json", "input")
    assert tiny_model_path.read_bytes() == before


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_json_clash_with_the_input_names_json_not_o(tiny_model_path: Path, tmp_path: Path, command: str) -> None:
    extra = ["-o", str(tmp_path / "g.npz"), *QUICK] if command == "generate" else []
    result = _cli(command, str(tiny_model_path), "--json", str(tiny_model_path), *extra)
    _assert_refused(result, 2, "--json")
    assert "output path" not in result.output and "-o " not in result.output.split("hint:")[1]


def test_quantize_refuses_json_on_the_calibration_file_via_another_spelling(
    tiny_model_path: Path, calib: Path, tmp_path: Path
) -> None:
    before = calib.read_bytes()
    alias = f"{calib.parent}/./{calib.name}"
    result = _cli("quantize", str(tiny_model_path), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(calib),
                  "--json", alias)
    _assert_refused(result, 2, "--json", "--calib-data")
    assert calib.read_bytes() == before and not (tmp_path / "q.onnx").exists()


def test_quantize_refuses_a_validation_report_on_the_json_report(tiny_model_path: Path, calib: Path,
                                                                   tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = _cli("quantize", str(tiny_model_path), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(calib),
                  "--json", str(report), "--validation-report", f"{tmp_path}/./r.json")
    _assert_refused(result, 2, "same file", "--json", "--validation-report")


# ------------------------------------------------ 2. non-finite weights refused at load


@pytest.mark.parametrize("tensor", ["w", "mean", "var", "scale"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_and_bn_statistics_are_refused_naming_the_tensor(tensor: str, bad: float) -> None:
    model = _conv_bn()
    value = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == tensor).copy()
    value.flat[1] = bad
    with pytest.raises(ModelLoadError, match=f"'{tensor}'.*(NaN|infinit)"):
        load_model_proto(_set_init(model, tensor, value))


def test_nan_in_a_constant_node_is_refused_naming_it() -> None:
    model = _conv_bn()
    weight = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "w").copy()
    weight.flat[0] = np.nan
    kept = [i for i in model.graph.initializer if i.name != "w"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w")))
    with pytest.raises(ModelLoadError, match="'w'.*NaN"):
        load_model_proto(model)


def test_an_infinite_clip_bound_is_not_a_weight_and_loads() -> None:
    """-inf/+inf are legitimate outside weights (an open Clip bound, an attention mask)."""
    model = _conv_bn()
    model.graph.node[-1].CopyFrom(helper.make_node("Clip", ["b", "low", ""], ["y"], name="clip"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(-np.inf, np.float32), "low"))
    assert load_model_proto(model).input_shape == (2, 6, 6)


def test_every_command_refuses_nan_weights(tiny_model_path: Path, calib: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_model_path))
    weight = next(i for i in model.graph.initializer if len(i.dims) == 4)
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    bad = tmp_path / "nan.onnx"
    onnx.save(model, str(bad))
    out = tmp_path / "out.npz"
    for args in (["inspect", str(bad)], ["generate", str(bad), "-o", str(out), *QUICK],
                 ["quantize", str(bad), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(calib)],
                 ["validate", str(bad)]):
        _assert_refused(_cli(*args), 2, weight.name, "NaN")
    assert not out.exists()


def test_negative_variance_below_epsilon_is_refused_without_a_numpy_warning(calib: Path, tmp_path: Path) -> None:
    model = _conv_bn(shape=(1, 3, 12, 12), var=np.array([1.0, -1.0, 1.0, 1.0], np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModelLoadError, match="'var'.*negative"):
            load_model_proto(model)
    path = tmp_path / "negvar.onnx"
    onnx.save(model, str(path))
    result = _cli("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(calib))
    _assert_refused(result, 2, "'var'", "negative")
    assert "RuntimeWarning" not in result.output


def test_variance_negative_within_epsilon_loads_but_is_no_target() -> None:
    """var + epsilon >= 0 still computes; the statistic just cannot be a DGH target."""
    loaded = load_model_proto(_conv_bn(var=np.array([1.0, -1e-6, 1.0, 1.0], np.float32)))
    assert not loaded.bn_nodes[0].usable and "negative" in (loaded.bn_nodes[0].problem or "")


# ---------------------------------------------- 3. custom-domain ops: a clean refusal


def _custom_op_model(tiny_model_path: Path, tmp_path: Path) -> Path:
    model = onnx.load(str(tiny_model_path))
    nodes = model.graph.node
    index = next(i for i, node in enumerate(nodes) if node.op_type == "Relu")
    original = nodes[index].output[0]
    nodes[index].output[0] = original + "_pre"
    nodes.insert(index + 1, helper.make_node("MyRelu", [original + "_pre"], [original], domain="com.example",
                                             name="custom_relu"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("with_calib", [True, False])
def test_quantize_refuses_a_custom_domain_op_naming_node_and_domain(
    tiny_model_path: Path, calib: Path, tmp_path: Path, with_calib: bool
) -> None:
    path = _custom_op_model(tiny_model_path, tmp_path)
    out = tmp_path / "q.onnx"
    extra = ["--calib-data", str(calib)] if with_calib else QUICK
    result = _cli("quantize", str(path), "-o", str(out), *extra)
    _assert_refused(result, 2, "custom_relu", "com.example")
    assert not out.exists()


def test_inspect_says_a_custom_domain_op_is_not_ready_and_does_not_advise_calib_data(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    path = _custom_op_model(tiny_model_path, tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and "NOT READY" in result.output
    assert "com.example" in result.output and "--calib-data" not in result.output


# ------------------------------------------------------- 4. a full disk: clean error


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


def test_atomic_write_on_a_full_disk_names_the_path_and_leaves_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _no_space(monkeypatch)
    with pytest.raises(OutputPathError, match="x.bin.*No space"):
        atomic_write_bytes(tmp_path / "x.bin", b"abc")
    assert list(tmp_path.iterdir()) == []


def test_quantize_and_generate_on_a_full_disk_exit_2(tiny_model_path: Path, calib: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "full").mkdir()
    _no_space(monkeypatch)
    out = tmp_path / "full" / "q.onnx"
    _assert_refused(_cli("quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(calib)),
                    2, str(out), "No space")
    images = tmp_path / "full" / "g.npz"
    _assert_refused(_cli("generate", str(tiny_model_path), "-o", str(images), *QUICK), 2, str(images), "No space")
    assert list((tmp_path / "full").iterdir()) == []


# ----------------------------------------- 5. numpy headers read before any allocation


def _npy_header_only(path: Path, shape: tuple[int, ...], payload: int = 64) -> Path:
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
        handle.write(b"\0" * payload)
    return path


def test_npy_header_declaring_292_gib_is_refused_with_the_figure(tmp_path: Path) -> None:
    path = _npy_header_only(tmp_path / "huge.npy", (100_000_000, 1, 28, 28))
    assert path.stat().st_size < 256
    with pytest.raises(CalibrationDataError, match=r"292\.1 GiB.*(bytes|memory)"):
        load_images_npz(path)


def test_npz_member_declaring_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    import zipfile

    member = _npy_header_only(tmp_path / "images.npy", (1000, 3, 12, 12))
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(member, "images.npy")
    with pytest.raises(CalibrationDataError, match=r"images.*1000, 3, 12, 12.*holds only"):
        load_images_npz(path)


def test_cli_refuses_a_huge_header_in_calib_data_and_labels(tiny_model_path: Path, tmp_path: Path) -> None:
    huge = _npy_header_only(tmp_path / "huge.npy", (100_000_000, 1, 28, 28))
    _assert_refused(_cli("quantize", str(tiny_model_path), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(huge)),
                    2, "GiB")
    labels = _npy_header_only(tmp_path / "labels.npy", (10**12,))
    _assert_refused(_cli("validate", str(tiny_model_path), "--labels", str(labels),
                         "--data", str(save_images_npz(tmp_path / "d.npz", np.zeros((2, 3, 12, 12), np.float32)))),
                    2, "labels", "declares shape (1000000000000,)", "TiB")


# --------------------------------------------------- 6. memory estimated up front


@pytest.fixture
def huge_input_model(tmp_path: Path) -> Path:
    model = _conv_bn(shape=(1, 3, 100_000, 100_000))
    path = tmp_path / "huge_input.onnx"
    onnx.save(model, str(path))
    return path


def test_inspect_says_not_ready_for_an_input_too_large_for_memory(huge_input_model: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(huge_input_model)])
    assert result.exit_code == 1, result.output
    assert "NOT READY" in result.output and "GiB" in result.output and "--input-shape" in result.output


@pytest.mark.parametrize("command", ["generate", "quantize"])
def test_generate_and_quantize_refuse_an_input_too_large_with_the_figure(
    huge_input_model: Path, tmp_path: Path, command: str
) -> None:
    out = tmp_path / ("g.npz" if command == "generate" else "q.onnx")
    result = _cli(command, str(huge_input_model), "-o", str(out), "--iterations", "1")
    _assert_refused(result, 2, "TiB", "alone needs", "--input-shape")
    assert not out.exists()


def test_a_run_that_fits_in_smaller_batches_is_told_so(tiny_model_path: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxdgh.memory

    needed = onnxdgh.memory.estimate_run_memory(load_model(tiny_model_path), images=256, batch_size=64).needed_bytes
    monkeypatch.setattr(onnxdgh.memory, "machine_memory_bytes", lambda: needed - 1)
    result = _cli("generate", str(tiny_model_path), "-o", str(tmp_path / "g.npz"))
    _assert_refused(result, 2, onnxdgh.memory.format_bytes(needed), "--images", "--batch-size")
    assert _cli("generate", str(tiny_model_path), "-o", str(tmp_path / "g.npz"), *QUICK).exit_code == 0


def test_inspect_and_generate_give_the_same_figure(huge_input_model: Path, tmp_path: Path) -> None:
    import re

    figure = re.compile(r"\d[\d,.]* [GT]iB")
    inspected = figure.findall(CliRunner().invoke(main, ["inspect", str(huge_input_model)]).output)
    refused = figure.findall(_cli("generate", str(huge_input_model), "-o", str(tmp_path / "g.npz")).output)
    assert inspected and refused and inspected[0] == refused[0]


def test_memory_estimate_lets_an_ordinary_model_through(tiny_model_path: Path) -> None:
    from onnxdgh.memory import estimate_run_memory

    estimate = estimate_run_memory(load_model(tiny_model_path), images=256, batch_size=64)
    assert 0 < estimate.needed_bytes < estimate.available_bytes
    # 256 images of 3 x 12 x 12 float32 are part of the estimate.
    assert estimate.images_bytes == 256 * 3 * 12 * 12 * 4


# ------------------------------------------------------- 7. Ctrl-C at any time: 130


@pytest.mark.parametrize("delay", [0.0, 0.4, 1.5])
def test_ctrl_c_during_start_up_or_run_exits_130_without_a_traceback(tiny_model_path: Path, tmp_path: Path,
                                                                     delay: float) -> None:
    """SIGINT while the command modules (torch) import, or later while generating.

    (The first tens of milliseconds, Python's own start-up before onnxdgh code runs, are
    out of any program's reach.)
    """
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "onnxdgh", "generate", str(tiny_model_path),
         "-o", str(tmp_path / "g.npz"), "--iterations", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    seen = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # -X importtime reports each module as its import ends
            seen.append(line)
            module = line.rsplit("|", 1)[-1].strip()
            if module.startswith("onnxdgh."):  # the command line's own code runs: heavy imports follow
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "error: interrupted" in stderr and "hint:" not in stderr
    assert not (tmp_path / "g.npz").exists()


# ----------------------------------------------------------------- 8. the messages


def test_a_text_file_is_not_reported_as_pickled(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    path.write_text("hello world, not numpy\n")
    with pytest.raises(CalibrationDataError, match="not an .npz/.npy file") as caught:
        load_images_npz(path)
    assert "pickle" not in caught.value.message


def test_a_pickle_is_still_reported_as_pickled(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "p.npz"
    path.write_bytes(pickle.dumps({"images": [1, 2]}))
    with pytest.raises(CalibrationDataError, match="pickled"):
        load_images_npz(path)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationDataError, match="pickled"):
        load_images_npz(tmp_path / "o.npy")


def test_bad_json_metadata_has_its_own_message(tmp_path: Path) -> None:
    path = tmp_path / "meta.npz"
    np.savez(path, images=np.zeros((2, 3, 4, 4), np.float32), meta=np.array("{not json"))
    with pytest.raises(CalibrationDataError, match="'meta'.*not valid JSON") as caught:
        load_images_npz(path)
    assert "pickle" not in caught.value.message


def test_cycle_message_names_the_node(tmp_path: Path) -> None:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add1"), helper.make_node("Relu", ["a"], ["b"], name="relu1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, 4, 4])])
    path = tmp_path / "cycle.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    _assert_refused(result, 2, "add1")
    assert result.output.count("\n") == 2  # one error line, one hint line


def test_mean_hint_for_a_one_channel_model(tmp_path: Path) -> None:
    torch_module = settle_bn(TinyConvBnRelu(channels=1), (1, 12, 12))
    path = export_onnx(torch_module, (1, 12, 12), tmp_path / "gray.onnx")
    result = _cli("generate", str(path), "-o", str(tmp_path / "g.npz"), "--mean", "0.1,0.2", "--std", "0.3,0.3",
                  *QUICK)
    _assert_refused(result, 2, "--mean has 2 values", "1 channel")
    assert "1 or 1" not in result.output


# ------------------------------------------------------ 9. the rate of a resumed run


def _slow_steps(seconds: float, stop_at: int | None = None):
    seen = {"steps": 0}

    def callback(info: StepInfo) -> None:
        seen["steps"] += 1
        time.sleep(seconds)
        if stop_at is not None and seen["steps"] == stop_at:
            raise KeyboardInterrupt

    return callback, seen


def test_rate_divides_this_process_work_by_this_process_time(tiny_model_path: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_model_path)
    settings = dict(images=12, batch_size=4, iterations=6, checkpoint=str(tmp_path / "run.ckpt"), checkpoint_every=1)
    callback, _ = _slow_steps(0.0, stop_at=8)
    with pytest.raises(KeyboardInterrupt):
        generate(loaded, GenerateConfig(**settings), progress=False, callback=callback)
    callback, seen = _slow_steps(0.02)
    report = generate(loaded, GenerateConfig(**settings, resume=True), progress=False, callback=callback).report
    timings = report["timings"]
    assert seen["steps"] == 18 - 8 and timings["image_iterations"] == 4 * (18 - 8)
    assert timings["optimise_s"] >= seen["steps"] * 0.02
    assert timings["image_iterations_per_s"] <= timings["image_iterations"] / (seen["steps"] * 0.02)
    assert timings["optimise_total_s"] >= timings["optimise_s"]


# ------------------------------------------------------- 10. load_model's argument


def test_load_model_accepts_bytes_and_path_like(tiny_model_path: Path) -> None:
    assert load_model(os.fsencode(tiny_model_path)).input_shape == (3, 12, 12)
    assert load_model(str(tiny_model_path)).input_shape == (3, 12, 12)


@pytest.mark.parametrize("bad", [None, 42, onnx.ModelProto()])
def test_load_model_refuses_what_is_not_a_path_with_its_own_error(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="path"):
        load_model(bad)  # type: ignore[arg-type]

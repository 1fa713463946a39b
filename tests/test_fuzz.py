"""The fuzzing harness (tools/fuzz.py) in CI, its failure classifier, and the defects it found.

``test_fuzz_run`` draws a fixed-seed set of cases (mostly inspect/validate, a few
generate/quantize with one iteration) and requires no traceback, hang, bad exit code,
modified input or partial output. The classifier tests feed the supervisor crafted worker
replies so each failure kind is shown to be caught. The last group reproduces, one CLI
call each, the defects the harness found beyond issue 17's list.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxdgh.cli import main

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import fuzz  # noqa: E402
import fuzz_cases  # noqa: E402

CI_CASES = 250


def _seeds() -> fuzz_cases.Seeds:
    """Seeds with the float model standing in for the quantized one (enough to draw cases)."""
    return fuzz_cases.make_seeds(fuzz_cases.tiny_float_model())


def test_fuzz_run(tmp_path: Path) -> None:
    summary = fuzz.run_fuzz(CI_CASES, 0, tmp_path / "fuzz", time_limit=60, memory_gib=6)
    assert summary["cases"] == CI_CASES
    assert set(summary["by_command"]) == set(fuzz_cases.COMMANDS)
    # The run reaches the work, not only the loaders: the unmutated baseline cases succeed.
    assert summary["by_mutation"]["baseline"] == {"exit0": len(fuzz_cases.baseline_cases(_seeds()))}
    for command in fuzz_cases.COMMANDS:
        assert summary["by_command"][command].get("exit0", 0) > 0, command
    signatures = [f"{e['count']} x {e['signature']} ({e['reproducers'][:1]})" for e in summary["signatures"]]
    assert summary["failed_cases"] == 0, "\n".join(signatures)
    assert (tmp_path / "fuzz" / "summary.json").is_file()


# --------------------------------------------------------------------------- the classifier


class FakeWorker:
    """Stands in for the worker process: answers with a crafted reply, may touch the case folder."""

    def __init__(self, reply: dict[str, Any] | None, action: Any = None) -> None:
        self.reply = reply
        self.action = action
        self.starts = 1
        self.onnxdgh_path = ""
        self.stopped = 0

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        if self.action:
            self.action(Path(job["cwd"]))
        return self.reply

    def stop(self) -> None:
        self.stopped += 1


def _reply(code: int = 0, *, traceback: str | None = None, outputs: dict[str, str | None] | None = None,
           stderr: str = "") -> dict[str, Any]:
    return {"exit_code": code, "traceback": traceback, "stderr_tail": stderr, "stdout_tail": "",
            "traceback_in_output": "Traceback (most recent call last)" in stderr, "outputs": outputs or {}}


@pytest.mark.parametrize(
    ("reply", "action", "kinds"),
    [
        (_reply(2), None, []),
        (_reply(1, outputs={"out.json": None}), None, []),
        (_reply(1, traceback="Traceback (most recent call last):\nValueError: x"), None, ["traceback"]),
        (_reply(2, stderr="Traceback (most recent call last):\n  oops"), None, ["traceback"]),
        (_reply(3), None, ["bad_exit"]),
        (_reply(2, outputs={"out.onnx": None}), None, ["partial_output"]),
        (_reply(0, outputs={"out.npz": "does not load"}), None, ["partial_output"]),
        (None, None, ["hang"]),
        (_reply(0), lambda cwd: (cwd / "model.onnx").write_bytes(b"changed"), ["modified_input"]),
        (_reply(2), lambda cwd: (cwd / "model.onnx").unlink(), ["modified_input"]),
    ],
)
def test_classifier_catches_each_failure_kind(tmp_path: Path, reply: Any, action: Any, kinds: list[str]) -> None:
    fuzzer = fuzz.Fuzzer(tmp_path, time_limit=1, restart_every=0, memory_gib=0, cpu=-1, keep=1)
    fuzzer.worker = FakeWorker(reply, action)  # type: ignore[assignment]
    _, found, _ = fuzzer.run_files(["inspect", "model.onnx"], {"model.onnx": b"model"})
    assert found == kinds
    if "hang" in kinds:
        assert fuzzer.worker.stopped == 1  # the hung worker is killed (and restarted on the next case)


def test_failed_case_is_recorded_with_reproducer(tmp_path: Path) -> None:
    fuzzer = fuzz.Fuzzer(tmp_path, time_limit=1, restart_every=0, memory_gib=0, cpu=-1, keep=1)
    fuzzer.worker = FakeWorker(_reply(0))  # type: ignore[assignment]
    case = fuzz_cases.Case("generate", ["generate", "model.onnx", "-o", "out.npz"], {"model.onnx": b"m"}, ["none"],
                           {"-o": "out.npz"})
    fuzzer.run_case(case)  # exit 0 without the -o file
    assert fuzzer.failure_counts == {"missing_output": 1}
    (entry,) = fuzzer.signatures.values()
    folder = tmp_path / entry["reproducers"][0]
    assert (folder / "model.onnx").read_bytes() == b"m"
    assert "python3 -m onnxdgh generate model.onnx -o out.npz" in (folder / "repro.sh").read_text()


def test_check_output_refuses_incomplete_files(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"\x08")
    (tmp_path / "a.json").write_text("{")
    (tmp_path / ".a.onnx.123.tmp").write_bytes(b"")
    np.savez(tmp_path / "nan.npz", images=np.full((1, 3, 4, 4), np.nan, np.float32))
    (tmp_path / "ok.json").write_text("{}")
    for name in ("a.onnx", "a.json", ".a.onnx.123.tmp", "nan.npz"):
        assert fuzz._check_output(tmp_path / name), name
    assert fuzz._check_output(tmp_path / "ok.json") is None


def test_cases_are_reproducible() -> None:
    from hypothesis import given, seed, settings

    seeds = _seeds()

    def draw(n: int) -> list[tuple[list[str], list[str]]]:
        drawn: list[tuple[list[str], list[str]]] = []

        @settings(max_examples=n, database=None, deadline=None)
        @seed(7)
        @given(case=fuzz_cases.case_strategy(seeds))
        def collect(case: fuzz_cases.Case) -> None:
            drawn.append((case.args, case.mutations))

        collect()
        return drawn

    assert draw(30) == draw(30)


# --------------------------------------------------------------------------- defects it found


def _invoke(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args))
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.exc_info
    return result


def _write_model(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("name", [b"relu0", b"bn0"])  # a node name; a node name the checker lets through
def test_non_utf8_name_is_a_load_error(tmp_path: Path, name: bytes) -> None:
    data = fuzz_cases.tiny_float_model().SerializeToString().replace(name, name[:-1] + b"\xaa", 1)
    (tmp_path / "m.onnx").write_bytes(data)
    result = _invoke("inspect", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 2
    assert "is not UTF-8 text" in result.stderr and "hint:" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_unknown_tensor_data_type_is_a_load_error(tmp_path: Path) -> None:
    model = fuzz_cases.tiny_float_model()
    model.graph.initializer[1].data_type = 30  # no such TensorProto.DataType: the checker raises ValueError
    result = _invoke("inspect", str(_write_model(tmp_path / "m.onnx", model)))
    assert result.exit_code == 2
    assert "fails the ONNX checker" in result.stderr


@pytest.mark.parametrize(("key", "value", "message"), [("offset", "x", "malformed external data"),
                                                       ("length", "-1", "malformed external data"),
                                                       ("location", "w.bin\0x", "NUL byte")])
def test_bad_external_data_fields_are_load_errors(tmp_path: Path, key: str, value: str, message: str) -> None:
    model = fuzz_cases.tiny_float_model()
    tensor = model.graph.initializer[0]
    (tmp_path / "w.bin").write_bytes(tensor.raw_data or numpy_helper.to_array(tensor).tobytes())
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    fields = {"location": "w.bin", key: value}
    for name, text in fields.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = name, text
    result = _invoke("inspect", str(_write_model(tmp_path / "m.onnx", model)))
    assert result.exit_code == 2
    assert message in result.stderr and "hint:" in result.stderr


def test_overlong_external_data_name_is_a_load_error(tmp_path: Path) -> None:
    model = fuzz_cases.tiny_float_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "a" * 300  # longer than a file name may be (ENAMETOOLONG)
    result = _invoke("inspect", str(_write_model(tmp_path / "m.onnx", model)))
    assert result.exit_code == 2
    assert "cannot be read" in result.stderr and "hint:" in result.stderr


@pytest.mark.parametrize("dtype", [onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL])
def test_initializer_with_wrong_data_size_is_a_load_error(tmp_path: Path, dtype: int) -> None:
    model = fuzz_cases.tiny_float_model()
    mean = next(t for t in model.graph.initializer if t.name == "bn1.mean")
    mean.raw_data = mean.raw_data[:-4]  # 12 bytes for dims [4]: 3 floats, or 12 bools
    mean.data_type = dtype
    # conv1 (before bn1) in a custom domain: the checker's shape inference stops there.
    next(n for n in model.graph.node if n.name == "conv1").domain = "custom.fuzz"
    model.opset_import.append(onnx.helper.make_opsetid("custom.fuzz", 1))
    result = _invoke("inspect", str(_write_model(tmp_path / "m.onnx", model)))
    assert result.exit_code == 2
    assert "bn1.mean" in result.stderr and "hint:" in result.stderr


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _damaged_member(data: bytes) -> bytes:
    """Flip a byte inside the first member's data: the zip opens, reading the member fails (CRC)."""
    out = bytearray(data)
    out[100] ^= 0xFF  # inside the member's .npy header (the zip local header is ~40 bytes)
    return bytes(out)


@pytest.mark.parametrize("damage", ["truncated", "member"])
def test_damaged_npz_is_refused_everywhere(tmp_path: Path, damage: str) -> None:
    images = np.zeros((2, 3, 8, 8), np.float32)
    labels = np.zeros(2, np.int64)
    model = _write_model(tmp_path / "m.onnx", fuzz_cases.tiny_float_model())
    cut = (lambda b: b[: len(b) // 2]) if damage == "truncated" else _damaged_member
    (tmp_path / "images.npz").write_bytes(cut(_npz_bytes(images=images)))
    (tmp_path / "good.npz").write_bytes(_npz_bytes(images=images))
    (tmp_path / "labels.npz").write_bytes(cut(_npz_bytes(labels=labels)))
    with pytest.raises(zipfile.BadZipFile):  # the damage is real: numpy itself fails on it
        with np.load(tmp_path / "images.npz") as loaded:
            loaded["images"]
    for args in (
        ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(tmp_path / "images.npz")],
        ["validate", str(model), "--reference", str(model), "--data", str(tmp_path / "images.npz")],
        ["validate", str(model), "--reference", str(model), "--data", str(tmp_path / "good.npz"),
         "--labels", str(tmp_path / "labels.npz")],
    ):
        result = _invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.stderr and "hint:" in result.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_pickled_labels_member_is_refused(tmp_path: Path) -> None:
    model = _write_model(tmp_path / "m.onnx", fuzz_cases.tiny_float_model())
    np.savez(tmp_path / "good.npz", images=np.zeros((2, 3, 8, 8), np.float32))
    np.savez(tmp_path / "labels.npz", labels=np.array([{"a": 1}, None], dtype=object))
    result = _invoke("validate", str(model), "--reference", str(model), "--data", str(tmp_path / "good.npz"),
                     "--labels", str(tmp_path / "labels.npz"))
    assert result.exit_code == 2
    assert "pickled" in result.stderr


def test_validate_top_zero_shows_no_layers(tmp_path: Path) -> None:
    model = _write_model(tmp_path / "m.onnx", fuzz_cases.tiny_float_model())
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 3, 8, 8), np.float32))
    made = _invoke("quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(tmp_path / "c.npz"),
                   "--no-validate")
    assert made.exit_code == 0, made.output
    result = _invoke("validate", str(tmp_path / "q.onnx"), "--reference", str(model), "--random-images", "1",
                     "--top", "0")
    assert result.exit_code in (0, 1)
    assert "Worst layers (0 of" in result.output


def test_quantize_bad_gate_is_refused_before_writing(tmp_path: Path) -> None:
    model = _write_model(tmp_path / "m.onnx", fuzz_cases.tiny_float_model())
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 3, 8, 8), np.float32))
    result = _invoke("quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(tmp_path / "c.npz"),
                     "--min-sqnr", "nan")
    assert result.exit_code == 2
    assert "--min-sqnr is nan" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx"]

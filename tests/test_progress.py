"""The one progress policy: bars only on a terminal, never with -q, overridable."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from onnxdgh.progress import progress_bar, progress_default


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_default_follows_the_terminal() -> None:
    assert progress_default(False, None, _Tty()) is True
    assert progress_default(False, None, io.StringIO()) is False


def test_quiet_wins_and_explicit_choice_overrides() -> None:
    assert progress_default(True, True, _Tty()) is False
    assert progress_default(False, True, io.StringIO()) is True
    assert progress_default(False, False, _Tty()) is False


def test_disabled_bar_still_iterates() -> None:
    assert list(progress_bar(range(3), enabled=False, desc="x", unit="y")) == [0, 1, 2]


def test_generate_writes_no_progress_lines_when_stderr_is_a_file(tiny_model_path: Path, tmp_path: Path) -> None:
    err = tmp_path / "stderr.txt"
    with err.open("w") as handle:
        proc = subprocess.run(
            [sys.executable, "-m", "onnxdgh", "generate", str(tiny_model_path), "-o", str(tmp_path / "g.npz"),
             "--images", "4", "--iterations", "3", "--mean", "0.3", "--std", "1.5"],
            stdout=subprocess.PIPE, stderr=handle, text=True, timeout=300,
        )
    text = err.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "generate:" not in text


def test_progress_flag_forces_bars_into_a_file(tiny_model_path: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "onnxdgh", "--progress", "generate", str(tiny_model_path), "-o",
         str(tmp_path / "g.npz"), "--images", "4", "--iterations", "3", "--mean", "0.3", "--std", "1.5"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "generate" in proc.stderr and "step" in proc.stderr

"""Every module imports by its dotted name, and the public functions are not shadowed."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import onnxdgh


def _modules() -> list[str]:
    # __main__ runs the command line when imported.
    return sorted(info.name for info in pkgutil.walk_packages(onnxdgh.__path__, "onnxdgh.") if not info.name.endswith("__main__"))


def test_every_module_imports_by_its_dotted_name() -> None:
    names = _modules()
    assert "onnxdgh.quantization.rounding" in names and "onnxdgh.validation.checks" in names
    for name in names:
        module = importlib.import_module(name)
        assert module.__name__ == name


def test_public_functions_stay_functions_after_their_subpackages_load() -> None:
    code = (
        "import onnxdgh.quantization.rounding, onnxdgh.generation.core, onnxdgh.validation.api\n"
        "import onnxdgh, inspect\n"
        "assert all(inspect.isfunction(getattr(onnxdgh, n)) for n in ('quantize', 'generate', 'validate'))\n"
        "import onnxdgh.quantization.rounding as r\n"
        "assert r.optimize_rounding\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

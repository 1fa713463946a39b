"""``--threshold`` left open: MSE for classifiers, the Lp search for dense predictions (issue 15)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnxdgh.cli import main
from onnxdgh.errors import InvalidInputError
from onnxdgh.load import load_model
from onnxdgh.quantization import QuantizeConfig, quantize
from onnxdgh.quantization.plan import default_threshold

from .conftest import export_onnx


class _DenseHead(nn.Module):
    """Conv -> ReLU -> Conv: an N x 2 x H x W map, as a detector's or segmenter's head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def dense_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return export_onnx(_DenseHead().eval(), (3, 8, 8), tmp_path / "dense.onnx", keep_bn=False)


def _meta(model) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {prop.key: prop.value for prop in model.metadata_props}


def test_default_threshold_by_output_rank(dense_path: Path, tiny_model_path: Path) -> None:
    assert default_threshold(load_model(tiny_model_path).model, 8) == "mse"  # N x K logits
    assert default_threshold(load_model(dense_path).model, 8) == "lp"  # N x 2 x H x W map
    assert default_threshold(load_model(dense_path).model, 4) == "mse"  # 4-bit grids need the clipping


class _SequenceScores(nn.Module):
    """Conv -> per-column Softmax: N x steps x classes, a text recogniser's CTC scores."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=2).transpose(1, 2).softmax(dim=-1)


def test_softmax_scores_of_any_rank_keep_mse(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = export_onnx(_SequenceScores().eval(), (3, 8, 8), tmp_path / "seq.onnx", keep_bn=False)
    assert default_threshold(load_model(path).model, 8) == "mse"


class _ProbabilityMap(nn.Module):
    """Conv -> Sigmoid: an N x 1 x H x W probability map, as DBNet's text detector writes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


def test_a_sigmoid_probability_map_keeps_mse(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = export_onnx(_ProbabilityMap().eval(), (3, 8, 8), tmp_path / "map.onnx", keep_bn=False)
    assert default_threshold(load_model(path).model, 8) == "mse"


def test_quantize_resolves_an_open_threshold_and_keeps_an_explicit_one(dense_path: Path) -> None:
    images = np.random.default_rng(0).uniform(-1, 1, size=(8, 3, 8, 8)).astype(np.float32)
    assert QuantizeConfig().threshold is None
    auto = quantize(str(dense_path), images, QuantizeConfig(), progress=False)
    assert _meta(auto.model)["onnxdgh.threshold"] == "lp"
    assert auto.report["config"]["threshold"] == "lp"
    explicit = quantize(str(dense_path), images, QuantizeConfig(threshold="mse"), progress=False)
    assert _meta(explicit.model)["onnxdgh.threshold"] == "mse"
    with pytest.raises(InvalidInputError, match="--threshold 'max'"):
        QuantizeConfig(threshold="max")  # type: ignore[arg-type]


def test_cli_quantize_dense_model_without_threshold_uses_lp(dense_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(1).uniform(-1, 1, size=(8, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(dense_path), "-o", str(out), "--calib-data", str(data),
                                       "--no-validate"])
    assert result.exit_code == 0, result.output
    assert "threshold lp" in result.output

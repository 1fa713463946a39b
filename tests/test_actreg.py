"""Activation-range regularisation (``--method actreg``): its losses, its probe, and the method end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnxdgh.cli import main
from onnxdgh.convert import to_torch
from onnxdgh.generation import GenerateConfig, generate
from onnxdgh.generation.activation import (
    SPREAD,
    activation_range_loss,
    balance_loss,
    generate_actreg,
    preactivation_probe,
)
from onnxdgh.generation.core import resolve_normalization
from onnxdgh.generation.procedural import procedural_images, procedural_pixels
from onnxdgh.load import load_model

from .conftest import export_onnx


class _TinyFolded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def folded_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return export_onnx(_TinyFolded().eval(), (3, 10, 10), tmp_path / "folded.onnx", keep_bn=False)


def test_activation_range_loss_penalises_dead_negative_and_exploding_channels() -> None:
    torch.manual_seed(0)
    healthy = torch.randn(4, 8, 5, 5)
    loss, fractions = activation_range_loss([healthy])
    assert float(loss) == 0.0 and fractions == {"dead": 0.0, "negative": 0.0, "exploding": 0.0}
    z = healthy.clone()
    z[:, 0] = 0.5  # stopped varying
    z[:, 1] = healthy[:, 1] - 10.0  # below zero everywhere
    z[:, 2] = healthy[:, 2] * (4 * SPREAD)  # far above its layer
    loss, fractions = activation_range_loss([z.requires_grad_(True)])
    assert float(loss.detach()) > 0.0
    assert fractions["dead"] == pytest.approx(1 / 8) and fractions["exploding"] == pytest.approx(1 / 8)
    assert fractions["negative"] >= 1 / 8
    loss.backward()  # differentiable in the activations: the pixels get a gradient through them
    assert float(z.grad.abs().sum()) > 0.0


def test_balance_loss_rewards_confident_and_balanced_predictions() -> None:
    k = 4
    assert float(balance_loss(torch.zeros(8, 3, 2, 2))) == 0.0  # not a classifier's N x K
    assert float(balance_loss(torch.zeros(8, k))) == pytest.approx(0.0, abs=1e-6)  # uniform: H(p_i) = H(mean)
    confident = torch.full((8, k), -20.0)
    confident[torch.arange(8), torch.arange(8) % k] = 20.0
    assert float(balance_loss(confident)) == pytest.approx(-1.0, abs=1e-4)  # one-hot, classes balanced
    collapsed = torch.full((8, k), -20.0)
    collapsed[:, 0] = 20.0
    assert float(balance_loss(collapsed)) == pytest.approx(0.0, abs=1e-4)  # one class only: no reward


def test_preactivation_probe_returns_every_convolution_output(folded_path: Path) -> None:
    loaded = load_model(folded_path)
    model = to_torch(loaded)
    probe = preactivation_probe(model)
    x = torch.randn(3, 3, 10, 10)
    stretch, preacts = probe(x)
    assert [tuple(t.shape) for t in preacts] == [(3, 6, 10, 10), (3, 6, 10, 10)]
    torch.testing.assert_close(stretch[0], model.probe(x).stretch[0])
    first = next(node for node in loaded.model.graph.node if node.op_type == "Conv")
    weights = {init.name: torch.from_numpy(onnx.numpy_helper.to_array(init).copy()) for init in loaded.model.graph.initializer}
    expected = torch.nn.functional.conv2d(x, weights[first.input[1]], weights[first.input[2]], padding=1)
    torch.testing.assert_close(preacts[0], expected)  # the pre-activation, before the ReLU


def test_procedural_first_index_gives_the_same_images() -> None:
    whole = procedural_pixels(5, (3, 8, 8), seed=2)
    np.testing.assert_array_equal(procedural_pixels(2, (3, 8, 8), seed=2, first=3), whole[3:])
    mean, std = np.full(3, 0.5), np.full(3, 0.25)
    np.testing.assert_array_equal(procedural_images(2, (3, 8, 8), 2, mean, std, first=3),
                                  procedural_images(5, (3, 8, 8), 2, mean, std)[3:])


def test_generate_actreg_images_in_range_deterministic_and_changed(folded_path: Path) -> None:
    loaded = load_model(folded_path)
    config = GenerateConfig(images=5, iterations=4, batch_size=3, method="actreg", preprocess="unit")
    result = generate(loaded, config, progress=False)
    assert result.images.shape == (5, 3, 10, 10) and result.images.dtype == np.float32
    assert result.images.min() >= 0.0 and result.images.max() <= 1.0
    assert result.report["method"] == "actreg" and result.report["actreg"]["start"] == "procedural"
    assert set(result.report["actreg"]["penalised_channels"]) == {"start", "end"}
    np.testing.assert_array_equal(result.images, generate(loaded, config, progress=False).images)
    # the optimisation moved the images away from the procedural start
    start = procedural_images(5, (3, 10, 10), 0, np.zeros(3), np.ones(3))
    assert not np.allclose(result.images, np.clip(start, 0.0, 1.0), atol=1e-3)


def test_generate_actreg_from_noise_and_without_the_activation_term(folded_path: Path) -> None:
    loaded = load_model(folded_path)
    config = GenerateConfig(images=2, iterations=2, batch_size=2, method="actreg", preprocess="unit")
    norm = resolve_normalization(loaded, config)
    images, report = generate_actreg(loaded, config, norm, start="noise", activation_weight=0.0)
    assert images.shape == (2, 3, 10, 10) and report["start"] == "noise" and report["activation_weight"] == 0.0
    assert all(math.isfinite(v) for _, v in report["loss_history_first_batch"])
    with pytest.raises(ValueError, match="start 'data'"):
        generate_actreg(loaded, config, norm, start="data")


def test_cli_generate_method_actreg(folded_path: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "a.npz", tmp_path / "a.json"
    result = CliRunner().invoke(main, ["generate", str(folded_path), "-o", str(out), "--method", "actreg",
                                       "--images", "2", "--iterations", "2", "--preprocess", "unit",
                                       "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["method"] == "actreg"
    with np.load(out) as data:
        assert data["images"].shape == (2, 3, 10, 10)

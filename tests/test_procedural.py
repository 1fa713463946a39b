"""The BN-free fallback: procedural images, ``--method auto``'s choice, and quantize with no flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnxdgh.cli import main
from onnxdgh.errors import InvalidInputError
from onnxdgh.generation import GenerateConfig, generate
from onnxdgh.generation.method import choose_method, expected_quality, resolve_method
from onnxdgh.generation.procedural import KINDS, procedural_images, procedural_pixels
from onnxdgh.load import load_model

from .conftest import export_onnx


class TinyConvRelu(nn.Module):
    """Conv-BN-ReLU x2, global pool, linear; exported with the exporter's default BN folding."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def folded_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return export_onnx(TinyConvRelu().eval(), (3, 12, 12), tmp_path / "folded.onnx", keep_bn=False)


def test_folded_export_has_no_bn_and_auto_picks_procedural(folded_path: Path, tiny_model_path: Path) -> None:
    folded = load_model(folded_path)
    assert not folded.bn_nodes
    assert choose_method(folded) == "procedural"
    assert choose_method(folded, allow_no_bn=True) == "dgh"
    assert choose_method(load_model(tiny_model_path)) == "dgh"
    assert choose_method(folded, "noise") == "noise"
    assert resolve_method(folded, GenerateConfig()).method == "procedural"
    with pytest.raises(InvalidInputError, match="--sas has no effect with --method procedural"):
        resolve_method(folded, GenerateConfig(sas=True))


def test_procedural_pixels_valid_deterministic_and_varied() -> None:
    a = procedural_pixels(9, (3, 20, 24), seed=3)
    assert a.shape == (9, 3, 20, 24) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, procedural_pixels(9, (3, 20, 24), seed=3))
    # image k does not depend on how many are drawn; another seed gives other images
    np.testing.assert_array_equal(a[:4], procedural_pixels(4, (3, 20, 24), seed=3))
    assert not np.allclose(a, procedural_pixels(9, (3, 20, 24), seed=4))
    # varied: every image differs from every other, and each has structure (not flat)
    flat = a.reshape(9, -1)
    distances = np.abs(flat[:, None, :] - flat[None, :, :]).mean(axis=2)
    assert distances[~np.eye(9, dtype=bool)].min() > 0.01
    assert all(image.std() > 0.01 for image in a)
    assert len(KINDS) == 3
    grey = procedural_pixels(3, (1, 28, 28), seed=0)
    assert grey.shape == (3, 1, 28, 28) and 0.0 <= grey.min() and grey.max() <= 1.0


def test_procedural_images_follow_the_normalisation() -> None:
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = procedural_images(6, (3, 16, 16), 0, mean, std)
    pixels = procedural_pixels(6, (3, 16, 16), 0)
    np.testing.assert_allclose(x * std.reshape(1, 3, 1, 1) + mean.reshape(1, 3, 1, 1), pixels, atol=1e-5)


def test_generate_auto_on_folded_model(folded_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="normalisation") as info:
        generate(folded_path, GenerateConfig(images=6), progress=False)
    assert "--preprocess" in (info.value.hint or "")
    result = generate(folded_path, GenerateConfig(images=6, preprocess="imagenet"), progress=False)
    assert result.report["method"] == "procedural" and result.report["method_requested"] == "auto"
    low, high = np.array(result.report["normalization"]["low"]), np.array(result.report["normalization"]["high"])
    assert np.all(result.images >= low.reshape(1, -1, 1, 1) - 1e-6)
    assert np.all(result.images <= high.reshape(1, -1, 1, 1) + 1e-6)
    assert result.report["normalization"]["clamped_fraction"] < 1e-3  # in range by construction


def test_quantize_folded_model_with_only_preprocess(folded_path: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    result = CliRunner().invoke(main, ["-q", "quantize", str(folded_path), "-o", str(out), "--preprocess", "imagenet",
                                       "--images", "8", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert out.exists() and json.loads(report.read_text())["calibration"]["source"] == "dgh:procedural"
    missing = CliRunner().invoke(main, ["-q", "quantize", str(folded_path), "-o", str(tmp_path / "n.onnx")])
    assert missing.exit_code == 2 and "--preprocess" in missing.output and "Traceback" not in missing.output
    assert not (tmp_path / "n.onnx").exists()


class OneBn(nn.Module):
    """``1 + plain`` convolutions, only the first with BN kept: BN coverage ``1 / (1 + plain)``
    (a partly folded export)."""

    def __init__(self, plain: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        for _ in range(plain):
            layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_few_bn_layers_get_mixed_images(tmp_path: Path) -> None:
    from .conftest import settle_bn

    torch.manual_seed(0)
    path = export_onnx(settle_bn(OneBn(plain=2), (3, 12, 12)), (3, 12, 12), tmp_path / "few.onnx")
    loaded = load_model(path)
    assert len(loaded.usable_bn_nodes) == 1 and choose_method(loaded) == "mixed"
    config = GenerateConfig(images=5, iterations=2, batch_size=4, preprocess="imagenet")
    result = generate(loaded, config, progress=False)
    assert result.images.shape == (5, 3, 12, 12)
    assert result.report["method"] == "mixed" and result.report["method_requested"] == "auto"
    assert result.report["mixed"] == {"dgh_images": 3, "procedural_images": 2}
    mean, std = np.array(result.report["normalization"]["mean"]), np.array(result.report["normalization"]["std"])
    np.testing.assert_allclose(result.images[3:], procedural_images(2, (3, 12, 12), 0, mean, std), atol=1e-5)
    assert not np.allclose(result.images[:3], procedural_images(3, (3, 12, 12), 0, mean, std), atol=1e-3)
    assert expected_quality(loaded).startswith("generation: mixed")


def test_very_few_bn_layers_get_procedural_images(tmp_path: Path) -> None:
    from onnxdgh.generation.method import MIXED_BELOW, PROCEDURAL_BELOW, bn_coverage

    from .conftest import settle_bn

    torch.manual_seed(0)
    path = export_onnx(settle_bn(OneBn(plain=4), (3, 12, 12)), (3, 12, 12), tmp_path / "fewer.onnx")
    loaded = load_model(path)
    assert len(loaded.usable_bn_nodes) == 1 and bn_coverage(loaded) == pytest.approx(0.2)
    assert 0.2 < PROCEDURAL_BELOW < 1 / 3 < MIXED_BELOW  # OneBn(plain=2) (1/3) stays mixed
    assert choose_method(loaded) == "procedural" and choose_method(loaded, "mixed") == "mixed"
    config = resolve_method(loaded, GenerateConfig(images=4, iterations=2, batch_size=4, preprocess="imagenet"))
    assert config.method == "procedural"
    assert expected_quality(loaded).startswith("generation: procedural images (only 1 BN layer(s)")
    # quantize's summary says why DGH did not run: how few BN layers there are.
    result = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--preprocess", "imagenet",
                                       "--images", "8", "--no-validate"])
    assert result.exit_code == 0, result.output
    assert "(dgh:procedural)" in result.stdout
    assert "1 BN layer(s) on 20 % of the convolutions, too few to steer DGH" in result.stdout

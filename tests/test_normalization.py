"""Input normalisation: options, presets, metadata keys, inference from the first BN-ed layer, divergence stops."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from onnxdgh.cli import main
from onnxdgh.errors import GenerationDivergedError, InvalidInputError
from onnxdgh.generation import GenerateConfig, generate
from onnxdgh.load import LoadedModel, load_model
from onnxdgh.normalization import (
    PRESETS,
    describe,
    infer_input_distribution,
    metadata_normalization,
    resolve_normalization,
)

from .conftest import TinyConvBnRelu, export_onnx
from .helpers_generate import consistent_model

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SHAPE = (3, 12, 12)
QUICK = dict(images=8, batch_size=4, iterations=3)


class _Shifted(nn.Module):
    """TinyConvBnRelu behind an in-graph ``(x - shift) / scale``: a model that normalises raw input itself."""

    def __init__(self, shift: float, scale: float) -> None:
        super().__init__()
        self.shift, self.scale = shift, scale
        self.body = TinyConvBnRelu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.shift) / self.scale)


def _inputs(count: int, generator: torch.Generator, *, smooth: bool) -> torch.Tensor:
    """Standardised noise; ``smooth`` adds spatial (5x5 box) and channel (shared component) correlation."""
    x = torch.randn(count, SHAPE[0], SHAPE[1] + 4, SHAPE[2] + 4, generator=generator)
    if smooth:
        x = F.avg_pool2d(x, 5, stride=1)
        x = 0.8 * x[:, :1] + 0.6 * x
    else:
        x = x[:, :, : SHAPE[1], : SHAPE[2]]
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)


def _settled(path: Path, make_input, *, module: nn.Module | None = None, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """Export a model whose BNs hold the exact average statistics of ``make_input(generator)`` batches.

    Returns the path and the per-channel mean and std of everything it was settled on.
    """
    torch.manual_seed(seed)
    module = module if module is not None else TinyConvBnRelu()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = None  # cumulative average: running stats are those of the data
    generator = torch.Generator().manual_seed(seed + 1)
    seen = []
    module.train()
    with torch.no_grad():
        for _ in range(20):
            x = make_input(generator)
            seen.append(x)
            module(x)
    data = torch.cat(seen)
    mean = data.mean(dim=(0, 2, 3)).numpy()
    std = data.std(dim=(0, 2, 3)).numpy()
    return export_onnx(module.eval(), SHAPE, path), mean, std


def _natural(generator: torch.Generator, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Natural-photo-like pixels (smooth, correlated, in [0, 1], ~0.45 +- 0.25) through ``(p - mean) / std``."""
    pixels = (_inputs(16, generator, smooth=True) * 0.25 + 0.45).clamp(0.0, 1.0)
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _stripped(path: Path) -> LoadedModel:
    return replace(load_model(path), metadata={})


def _with_props(path: Path, props: dict[str, str]) -> LoadedModel:
    return replace(load_model(path), metadata=props)


# ------------------------------------------------------------------ inference


@pytest.mark.parametrize("smooth", [False, True], ids=["iid", "correlated"])
def test_inference_recovers_known_per_channel_moments(tmp_path: Path, smooth: bool) -> None:
    target_mean = torch.tensor([0.1, -0.4, 2.0]).view(1, -1, 1, 1)
    target_std = torch.tensor([0.5, 1.0, 3.0]).view(1, -1, 1, 1)
    path, mean, std = _settled(tmp_path / "m.onnx", lambda gen: _inputs(16, gen, smooth=smooth) * target_std + target_mean)
    inference = infer_input_distribution(load_model(path))
    assert inference is not None and inference.equations == 8
    # The mean is exact up to running-statistics noise; the spread model is exact for iid
    # inputs and an approximation (box-filtered noise is not rho^distance) when correlated.
    np.testing.assert_allclose(inference.mean, mean, atol=0.1 * std.max())
    # A channel with a small std adds little to any BN variance (channel 0: ~3 %), so its
    # std is the least certain; iid still lands within 15 %.
    np.testing.assert_allclose(inference.std, std, rtol=0.15 if not smooth else 0.35)
    assert float(inference.mean_uncertainty.max()) < 0.25
    if not smooth:
        assert inference.confidence == "high" and inference.spatial_correlation == 0.0
    else:
        assert inference.spatial_correlation >= 0.4 and inference.channel_correlation > 0.0


@pytest.mark.parametrize("preset", list(PRESETS))
def test_inference_snaps_to_the_convention_the_model_was_trained_with(tmp_path: Path, preset: str) -> None:
    mean, std = (tuple(v) * (3 // len(v)) for v in PRESETS[preset])
    path, _, _ = _settled(tmp_path / "m.onnx", lambda gen: _natural(gen, mean, std))
    norm = resolve_normalization(_stripped(path))
    assert norm.source == "inferred" and norm.detail == preset
    np.testing.assert_allclose(norm.mean, mean)
    np.testing.assert_allclose(norm.std, std)
    assert norm.inference is not None and norm.inference.confidence in ("high", "medium")


def test_inference_through_in_graph_normalisation(tmp_path: Path) -> None:
    """(x - 127.5) / 64 inside the graph: the fitted moments are those of the raw 0-255 input."""
    path, _, _ = _settled(tmp_path / "m.onnx", lambda gen: _natural(gen, (0.0,) * 3, (1 / 255,) * 3),
                          module=_Shifted(127.5, 64.0))
    norm = resolve_normalization(load_model(path))
    assert norm.detail == "raw255"
    assert norm.inference is not None and 80 < float(norm.inference.mean.mean()) < 150


def test_bn_directly_on_the_input_is_read_exactly(tmp_path: Path) -> None:
    module = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Flatten())
    path, mean, std = _settled(tmp_path / "m.onnx", lambda gen: torch.randn(16, *SHAPE, generator=gen) * 3.0 + 5.0,
                               module=module)
    inference = infer_input_distribution(load_model(path))
    assert inference is not None and inference.layers == (inference.layers[0],)
    np.testing.assert_allclose(inference.mean, mean, rtol=1e-4)
    np.testing.assert_allclose(inference.std, std, rtol=1e-2)


def test_zero_sum_filters_hide_the_mean_and_nothing_is_decided(tmp_path: Path) -> None:
    # No padding: with zero padding the border positions would see the mean after all.
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        first = module[0]
        first.weight -= first.weight.mean(dim=(2, 3), keepdim=True)  # edge detectors: blind to the DC level
        first.bias.zero_()
    # std 8: far from every preset's prediction, so the spread alone cannot pick one
    path, _, _ = _settled(tmp_path / "m.onnx", lambda gen: _inputs(16, gen, smooth=False) * 8.0 + 3.0, module=module)
    loaded = load_model(path)
    inference = infer_input_distribution(loaded)
    assert inference is not None and inference.convention is None
    assert float(inference.mean_uncertainty.max()) > 1.0 and "hide the input mean" in (inference.problem or "")
    with pytest.raises(InvalidInputError, match="cannot be inferred") as info:
        resolve_normalization(loaded)
    assert "--preprocess" in (info.value.hint or "") and "--mean/--std" in (info.value.hint or "")


def test_no_bn_and_no_metadata_is_undecidable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folded = export_onnx(TinyConvBnRelu().eval(), SHAPE, tmp_path / "folded.onnx", keep_bn=False)
    with pytest.raises(InvalidInputError, match="no BatchNormalization layer on the input") as info:
        resolve_normalization(load_model(folded))
    assert "--preprocess imagenet|unit|symmetric|raw255" in (info.value.hint or "")


@pytest.mark.parametrize("name", ["fmnist_resnet8", "fmnist_mobilenetv2", "fmnist_resnet8_silu"])
def test_samples_without_metadata_land_on_their_standardised_convention(name: str) -> None:
    """The samples feed (pixel - 0.2860) / 0.3530 (samples/README.md): input mean 0, std 1 over the data."""
    loaded = load_model(SAMPLES / f"{name}.onnx")
    truth = loaded.input_normalization()
    assert truth is not None
    norm = resolve_normalization(replace(loaded, metadata={}))
    assert norm.source == "inferred" and norm.detail == "fitted" and norm.inference is not None
    assert abs(float(norm.inference.mean[0])) < 0.05 and abs(float(norm.inference.std[0]) - 1.0) < 0.05
    assert norm.inference.confidence == "high"
    # The fitted range (4 stds) holds the true valid range's upper end and reaches below its lower end.
    true_low, true_high = (0 - truth[0]) / truth[1], (1 - truth[0]) / truth[1]
    assert float(norm.low[0]) < float(true_low[0]) and abs(float(norm.high[0]) - float(true_high[0])) < 0.1


# -------------------------------------------------------------- metadata, presets


@pytest.mark.parametrize("keys", [("input_mean", "input_std"), ("mean", "std"), ("norm_mean", "norm_std")])
def test_metadata_under_each_key_pair(tiny_model_path: Path, keys: tuple[str, str]) -> None:
    norm = resolve_normalization(_with_props(tiny_model_path, {keys[0]: "[0.1, 0.2, 0.3]", keys[1]: "0.25"}))
    assert norm.source == "metadata" and norm.detail == "/".join(keys)
    np.testing.assert_allclose(norm.mean, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(norm.std, [0.25] * 3)


def test_metadata_on_the_0_255_scale_is_converted() -> None:
    found = metadata_normalization({"mean": "[123.675, 116.28, 103.53]", "std": "[58.395, 57.12, 57.375]"}, 3)
    assert found is not None and found[2] == "mean/std (0-255 scale)"
    np.testing.assert_allclose(found[0], PRESETS["imagenet"][0], atol=1e-6)
    np.testing.assert_allclose(found[1], PRESETS["imagenet"][1], atol=1e-6)
    # [0, 1] values stay as they are
    assert metadata_normalization({"mean": "0.5", "std": "0.5"}, 3)[2] == "mean/std"  # type: ignore[index]


def test_first_key_pair_wins_and_unusable_metadata_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    both = {"input_mean": "[0.5]", "input_std": "[0.5]", "mean": "[0.1]", "std": "[0.2]"}
    assert metadata_normalization(both, 1)[2] == "input_mean/input_std"  # type: ignore[index]
    with caplog.at_level(logging.WARNING, logger="onnxdgh.normalization"):
        fallback = metadata_normalization({"input_mean": "[0.5, 0.5]", "input_std": "[0.5]", "mean": "0.1", "std": "0.2"}, 3)
        assert fallback is not None and fallback[2] == "mean/std"
        for bad in ({"mean": "[0.5]", "std": "[0]"}, {"mean": "'a'", "std": "1"}, {"mean": "0.5"}, {"std": "[true]", "mean": "1"}):
            assert metadata_normalization(bad, 3) is None
    assert "2/1 values for a 3-channel input" in caplog.text and "std <= 0" in caplog.text


def test_options_beat_presets_beat_metadata(tiny_model_path: Path) -> None:
    loaded = _with_props(tiny_model_path, {"input_mean": "0.5", "input_std": "0.5"})
    assert resolve_normalization(loaded).source == "metadata"
    preset = resolve_normalization(loaded, preprocess="raw255")
    assert preset.source == "preset" and float(preset.high[0]) == pytest.approx(255.0)
    options = resolve_normalization(loaded, mean=(0.2,), std=(0.1,))
    assert options.source == "options" and float(options.low[0]) == pytest.approx(-2.0)


def test_preset_errors(tmp_path: Path) -> None:
    grey = _settled(tmp_path / "g.onnx", lambda gen: torch.randn(4, *SHAPE, generator=gen))[0]
    loaded = replace(load_model(grey), input_shape=(1, 12, 12))
    with pytest.raises(InvalidInputError, match="imagenet has 3 channels but the model input has 1"):
        resolve_normalization(loaded, preprocess="imagenet")
    with pytest.raises(InvalidInputError, match="--preprocess 'caffe' is not one of"):
        resolve_normalization(loaded, preprocess="caffe")
    with pytest.raises(InvalidInputError, match="--std has 2 values but the model input has 1"):
        resolve_normalization(loaded, mean=(0.5,), std=(0.5, 0.5))


def test_config_refuses_preprocess_with_mean_std_and_unknown_names() -> None:
    with pytest.raises(InvalidInputError, match="--preprocess and --mean/--std exclude each other"):
        GenerateConfig(preprocess="unit", mean=(0.5,), std=(0.5,))
    with pytest.raises(InvalidInputError, match="--preprocess 'bgr'"):
        GenerateConfig(preprocess="bgr")
    assert GenerateConfig(preprocess="imagenet").to_dict()["preprocess"] == "imagenet"


def test_describe_says_what_and_how_sure(tiny_model_path: Path) -> None:
    line = describe(resolve_normalization(load_model(tiny_model_path)))
    assert line.startswith("input normalisation inferred from ") and "confidence" in line and "\n" not in line
    assert "--preprocess" in line


# --------------------------------------------------------------------- divergence


def test_rising_bn_loss_stops_the_run(tmp_path: Path) -> None:
    path = consistent_model(tmp_path / "m.onnx")
    config = GenerateConfig(**QUICK, preprocess="raw255", lr=1e5, scheduler="none")
    with pytest.raises(GenerationDivergedError, match="BN loss rose from") as info:
        generate(path, config, progress=False)
    assert info.value.exit_code == 1 and "--preprocess" in (info.value.hint or "")


def _overflowing(path: Path) -> Path:
    """A model whose second conv overflows float32: every loss is infinite or NaN."""
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "features.3.weight":
            array = onnx.numpy_helper.to_array(init) * np.float32(1e30)
            init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    out = path.with_name("overflow.onnx")
    onnx.save(model, str(out))
    return out


def test_non_finite_loss_stops_the_run(tmp_path: Path) -> None:
    path = _overflowing(consistent_model(tmp_path / "m.onnx"))
    with pytest.raises(GenerationDivergedError, match="the loss is (nan|inf) at the start"):
        generate(path, GenerateConfig(**QUICK), progress=False)


def test_quantize_refuses_a_diverged_generation(tmp_path: Path) -> None:
    from onnxdgh.quantization import QuantizeConfig, quantize

    path = consistent_model(tmp_path / "m.onnx")
    config = GenerateConfig(**QUICK, preprocess="raw255", lr=1e5, scheduler="none")
    with pytest.raises(GenerationDivergedError):
        quantize(load_model(path), None, QuantizeConfig(), generate_config=config, progress=False)


# ---------------------------------------------------------------------------- CLI


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_cli_prints_the_inferred_normalisation_unless_quiet(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "imgs.npz"
    loud = _cli("generate", str(tiny_model_path), "-o", str(out), "--images", "4", "--iterations", "1")
    assert loud.exit_code == 0, loud.output
    assert loud.stderr.count("input normalisation inferred from") == 1 and "confidence" in loud.stderr
    quiet = _cli("-q", "generate", str(tiny_model_path), "-o", str(out), "--images", "4", "--iterations", "1")
    assert quiet.exit_code == 0 and "inferred" not in quiet.output


def test_cli_diverged_generation_exits_1_and_writes_nothing(tmp_path: Path) -> None:
    path = consistent_model(tmp_path / "m.onnx")
    out = tmp_path / "imgs.npz"
    result = _cli("-q", "generate", str(path), "-o", str(out), "--images", "8", "--batch-size", "4",
                  "--iterations", "3", "--preprocess", "raw255", "--lr", "1e5", "--scheduler", "none")
    assert result.exit_code == 1, result.output
    assert "error: image generation diverged" in result.output and "hint:" in result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("generate", ["--preprocess", "unit", "--mean", "0.5", "--std", "0.5"], "--preprocess and --mean/--std exclude"),
        ("generate", ["--preprocess", "bgr"], "--preprocess 'bgr' is not one of"),
        ("quantize", ["--preprocess", "unit", "--mean", "0.5", "--std", "0.5"], "--preprocess and --mean/--std exclude"),
        ("quantize", ["--preprocess", "bgr"], "--preprocess 'bgr' is not one of"),
    ],
)
def test_cli_bad_preprocess_exits_2(tiny_model_path: Path, tmp_path: Path, command: str, args: list[str],
                                    message: str) -> None:
    out = tmp_path / ("x.npz" if command == "generate" else "x.onnx")
    result = _cli(command, str(tiny_model_path), "-o", str(out), "--iterations", "1", *args)
    assert result.exit_code == 2 and message in result.output and "hint:" in result.output
    assert not out.exists()


def test_cli_quantize_passes_preprocess_to_the_generation(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = _cli("-q", "quantize", str(tiny_model_path), "-o", str(out), "--images", "8", "--iterations", "2",
                  "--batch-size", "8", "--preprocess", "symmetric", "--no-validate", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["generation"]["preprocess"] == "symmetric"
    assert report["generation"]["normalization"]["source"] == "preset"
    stats = report["statistics"]["input"]
    assert -1.0 - 1e-5 <= stats["min"] and stats["max"] <= 1.0 + 1e-5


def test_cli_quantize_refuses_preprocess_with_calibration_data(tiny_model_path: Path, tmp_path: Path) -> None:
    from onnxdgh.fileio import save_images_npz

    calib = save_images_npz(tmp_path / "c.npz", np.zeros((4, *SHAPE), np.float32), {"source": "test"})
    result = _cli("quantize", str(tiny_model_path), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(calib),
                  "--preprocess", "unit")
    assert result.exit_code == 2 and "--preprocess apply only when images are generated" in result.output


class _PaddedStem(nn.Module):
    """EfficientNet's "static same padding": an explicit zero Pad, then an unpadded Conv -> BN -> ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((1, 1, 1, 1))
        self.conv = nn.Conv2d(3, 8, 3, padding=0)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(self.pad(x))))
        return self.head(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("dead", [0, 2], ids=["all-alive", "two-dead-channels"])
def test_inference_follows_an_explicit_zero_pad_and_skips_dead_channels(tmp_path: Path, dead: int) -> None:
    target_mean = torch.tensor([0.1, -0.4, 2.0]).view(1, -1, 1, 1)
    target_std = torch.tensor([0.5, 1.0, 3.0]).view(1, -1, 1, 1)
    torch.manual_seed(0)
    module = _PaddedStem()
    with torch.no_grad():
        module.conv.weight[:dead] = 0.0  # dead filters: BN running variance 0 (as in EfficientNet-Lite0)
        module.conv.bias[:dead] = 0.0
    path, mean, std = _settled(tmp_path / "m.onnx", lambda gen: _inputs(16, gen, smooth=False) * target_std + target_mean,
                               module=module)
    loaded = load_model(path)
    assert any(node.op_type == "Pad" for node in loaded.model.graph.node)
    if dead:
        assert (np.sort(loaded.bn_nodes[0].var)[:dead] == 0).all()
    inference = infer_input_distribution(loaded)
    assert inference is not None and inference.equations == 8 - dead
    np.testing.assert_allclose(inference.mean, mean, atol=0.1 * std.max())
    np.testing.assert_allclose(inference.std, std, rtol=0.15)


def _text_like(generator: torch.Generator, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """High-contrast grey pixels (paper 0.85, ink 0.15 on ~30 % of a smooth field, same in every channel)."""
    field = _inputs(16, generator, smooth=True)[:, :1]
    pixels = torch.where(field > 0.5, 0.15, 0.85).expand(-1, SHAPE[0], -1, -1)
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def test_high_contrast_symmetric_input_is_not_taken_for_imagenet(tmp_path: Path) -> None:
    """Text-like input under (x - 0.5) / 0.5 has a spread midway between what photos would
    have under `symmetric` and under `imagenet`; the fill ratio of the shared std decides
    (the first rule, per-channel stds against photo statistics, snapped to `imagenet`)."""
    path, _, std = _settled(tmp_path / "m.onnx", lambda gen: _text_like(gen, (0.5,) * 3, (0.5,) * 3))
    inference = infer_input_distribution(load_model(path))
    assert inference is not None and inference.convention == "symmetric"
    assert inference.preset_scores["symmetric"] <= 1.0 < inference.preset_scores["imagenet"]
    assert abs(np.log(inference.scale / float(np.exp(np.log(std).mean())))) < 0.3  # the shared std is the data's
    assert resolve_normalization(_stripped(path)).detail == "symmetric"
    reported = inference.to_dict()
    assert set(reported["preset_scores"]) == set(PRESETS) and reported["preset_scores"]["unit"] > 1.0
    assert reported["input_std_shared"] == pytest.approx(inference.scale, rel=1e-5)

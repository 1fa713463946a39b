"""Stage 3: DGH image generation (losses, SAS exactness, ODSL, seeds, checkpoints) and `onnxdgh generate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from onnxdgh.cli import main
from onnxdgh.errors import InvalidInputError, UnsupportedModelError
from onnxdgh.fileio import load_images_npz
from onnxdgh.generation import GenerateConfig, StepInfo, evaluate_images, generate
from onnxdgh.generation.losses import StatsStore, batch_moments, bns_loss, odsl_per_image
from onnxdgh.generation.prep import Preprocessor, auto_margin
from onnxdgh.load import load_model

from .conftest import TinyConvBnRelu, export_onnx, settle_bn
from .helpers_generate import DATA_MEAN, DATA_STD, INPUT_SHAPE, consistent_model

# Small and quick: 12 images in batches of 4 (3 batches, so SAS really aggregates).
QUICK = dict(images=12, batch_size=4, iterations=6)


def _with_metadata(path: Path, mean: float = 0.5, std: float = 0.25) -> Path:
    model = onnx.load(str(path))
    for key, value in (("input_mean", json.dumps([mean])), ("input_std", json.dumps([std]))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    out = path.with_name(path.stem + "_meta.onnx")
    onnx.save(model, str(out))
    return out


# ------------------------------------------------------------------ losses and SAS


def test_sas_aggregation_equals_statistics_over_all_images() -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [5, 5, 3]  # a shorter last batch must be weighted correctly
    batches = [torch.randn(n, 6, 7, 7, generator=generator) * 3.0 + 10.0 for n in sizes]
    store = StatsStore(sizes, [6])
    for index, batch in enumerate(batches):
        store.store(index, [batch_moments(batch)])
    full_var, full_mean = torch.var_mean(torch.cat(batches), dim=(0, 2, 3), correction=0)

    mean, var = store.all_moments()[0]
    torch.testing.assert_close(mean, full_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, full_var, rtol=1e-4, atol=1e-5)

    # One batch's fresh terms (with gradient) recombined with the others' stored terms.
    fresh = batches[1].clone().requires_grad_(True)
    g_mean, g_var = store.global_moments(1, [batch_moments(fresh)])[0]
    torch.testing.assert_close(g_mean.detach(), full_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_var.detach(), full_var, rtol=1e-4, atol=1e-5)
    (g_mean.sum() + g_var.sum()).backward()
    assert fresh.grad is not None and float(fresh.grad.abs().sum()) > 0
    # The gradient is that of the whole-set statistics: each image carries weight 1/|D|.
    reference = torch.cat(batches).clone().requires_grad_(True)
    r_var, r_mean = torch.var_mean(reference, dim=(0, 2, 3), correction=0)
    (r_mean.sum() + r_var.sum()).backward()
    torch.testing.assert_close(fresh.grad, reference.grad[5:10], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_moments_equal_var_mean(channels_last: bool) -> None:
    x = torch.randn(6, 4, 5, 5) * 0.1 + 10.0  # large mean, small spread: no cancellation allowed
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got_mean, got_var = batch_moments(x)
    torch.testing.assert_close(got_mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_var, var, rtol=1e-4, atol=1e-7)
    flat = torch.randn(7, 3)
    torch.testing.assert_close(batch_moments(flat)[1], flat.var(dim=0, correction=0))


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (5, 3), (4, 3, 6)])
def test_batch_moments_gradient(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(batch_moments, (x,))


def test_bns_loss_is_eq4() -> None:
    mean, var = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 9.0])
    target = (torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0]))
    # ||(1, 0)||^2 + ||(2 - 1, 3 - 3)||^2 = 1 + 1 (up to the std epsilon)
    assert float(bns_loss([(mean, var)], [target])) == pytest.approx(2.0, abs=1e-5)


def test_odsl_is_eq7_per_image() -> None:
    logits = torch.tensor([[0.0, 3.0, -1.0], [2.0, 2.0, 2.0]])
    features = torch.zeros(2, 2, 3, 3)
    features[0] += 5.0  # image 0 deviates from the BN mean by 5 in each of 2 channels
    target = (torch.zeros(2), torch.zeros(2))
    loss = odsl_per_image([logits], features, target, delta=10.0)
    assert float(loss[0]) == pytest.approx(-(4.0**2) + (50.0 - 10.0), abs=1e-3)
    assert float(loss[1]) == pytest.approx(0.0, abs=1e-3)  # no spread, deviations within delta
    assert float(odsl_per_image([logits], None, None, delta=0.0)[0]) == pytest.approx(-16.0)


def test_prep_crops_flips_and_final_centre_crop() -> None:
    prep = Preprocessor(1, 6, 6, margin=4, sigma=1.25, enabled=True, low=torch.tensor([-1.0]), high=torch.tensor([1.0]))
    assert prep.canvas_shape == (1, 10, 10)
    canvas = torch.randn(8, 1, 10, 10) * 3
    view = prep.train_view(canvas, torch.Generator().manual_seed(0))
    assert view.shape == (8, 1, 6, 6)
    final = prep.final(canvas)
    assert final.shape == (8, 1, 6, 6)
    assert float(final.max()) <= 1.0 and float(final.min()) >= -1.0
    assert auto_margin(224, 224) == 32 and auto_margin(28, 28) == 4 and auto_margin(8, 8) == 2


# ------------------------------------------------------------------------ generate


def test_bns_loss_falls_by_a_large_factor(tmp_path: Path) -> None:
    path = consistent_model(tmp_path / "consistent.onnx")
    generator = torch.Generator().manual_seed(5)
    real_like = (torch.randn(64, *INPUT_SHAPE, generator=generator) * DATA_STD + DATA_MEAN).numpy()
    assert evaluate_images(load_model(path), real_like)["bns_loss"] < 0.01  # the targets are reachable
    result = generate(path, GenerateConfig(images=8, batch_size=8, iterations=30, method="bns"), progress=False)
    final = result.report["final"]
    assert final["bns_loss"] < final["bns_loss_initial"] / 10
    assert result.images.shape == (8, *INPUT_SHAPE) and result.images.dtype == np.float32


def test_odsl_widens_the_output_range(tmp_path: Path) -> None:
    loaded = load_model(consistent_model(tmp_path / "consistent.onnx"))
    base = dict(images=8, batch_size=8, iterations=30)
    without = generate(loaded, GenerateConfig(**base, odsl=False), progress=False).report["final"]
    with_odsl = generate(loaded, GenerateConfig(**base, odsl_lambda=1.0), progress=False).report["final"]
    assert with_odsl["output_range"]["mean"] > 1.3 * without["output_range"]["mean"]


def test_odsl_default_delta_scales_with_the_last_bn(tiny_model_path: Path) -> None:
    loaded = load_model(tiny_model_path)
    last = loaded.bn_nodes[-1]  # the deeper of the two BNs
    report = generate(loaded, GenerateConfig(**QUICK), progress=False).report
    assert report["last_bn_layer"] == last.node_name
    assert report["odsl_delta"] == pytest.approx(0.5 * float(np.sum(last.var)), rel=1e-5)
    assert generate(loaded, GenerateConfig(**QUICK, odsl_delta=0.25), progress=False).report["odsl_delta"] == 0.25


def test_same_seed_same_images_other_seed_other_images(tiny_model_path: Path) -> None:
    loaded = load_model(tiny_model_path)
    first = generate(loaded, GenerateConfig(**QUICK, seed=3), progress=False).images
    second = generate(loaded, GenerateConfig(**QUICK, seed=3), progress=False).images
    other = generate(loaded, GenerateConfig(**QUICK, seed=4), progress=False).images
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


class _Stop(Exception):
    pass


def _stop_at(step: int, error: type[BaseException]):
    seen = {"steps": 0}

    def callback(info: StepInfo) -> None:
        seen["steps"] += 1
        if seen["steps"] == step:
            raise error

    return callback


@pytest.mark.parametrize("stop_step, error, refresh", [(8, KeyboardInterrupt, "rerun"), (14, _Stop, "reuse")])
def test_resume_ends_with_the_images_of_an_uninterrupted_run(
    tiny_model_path: Path, tmp_path: Path, stop_step: int, error: type[BaseException], refresh: str
) -> None:
    """Ctrl-C mid-iteration (checkpoint written on the way out) and a crash (last periodic checkpoint)."""
    loaded = load_model(tiny_model_path)
    settings = dict(QUICK, iterations=7, stats_refresh=refresh)
    reference = generate(loaded, GenerateConfig(**settings), progress=False)

    checkpoint = tmp_path / "run.ckpt"
    config = GenerateConfig(**settings, checkpoint=str(checkpoint), checkpoint_every=2)
    with pytest.raises(error):
        generate(loaded, config, progress=False, callback=_stop_at(stop_step, error))
    assert checkpoint.exists()
    resumed = generate(loaded, GenerateConfig(**settings, checkpoint=str(checkpoint), checkpoint_every=2, resume=True),
                       progress=False)
    assert resumed.report["resumed_from"] is not None
    np.testing.assert_array_equal(resumed.images, reference.images)


def test_ctrl_c_stops_at_a_batch_boundary_with_a_checkpoint(tiny_model_path: Path, tmp_path: Path) -> None:
    import os
    import signal

    loaded = load_model(tiny_model_path)
    reference = generate(loaded, GenerateConfig(**QUICK), progress=False)
    checkpoint = tmp_path / "run.ckpt"
    config = GenerateConfig(**QUICK, checkpoint=str(checkpoint), checkpoint_every=100)

    def press_ctrl_c(info: StepInfo) -> None:
        if info.iteration == 2 and info.batch == 1:
            os.kill(os.getpid(), signal.SIGINT)  # deferred by generate() to the end of this step

    with pytest.raises(KeyboardInterrupt):
        generate(loaded, config, progress=False, callback=press_ctrl_c)
    assert torch.load(checkpoint, weights_only=True)["batch"] == 2
    resumed = generate(loaded, GenerateConfig(**QUICK, checkpoint=str(checkpoint), resume=True), progress=False)
    np.testing.assert_array_equal(resumed.images, reference.images)


def test_resume_with_other_settings_is_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    generate(tiny_model_path, GenerateConfig(**QUICK, checkpoint=str(checkpoint)), progress=False)
    with pytest.raises(InvalidInputError, match="other settings.*lr"):
        generate(tiny_model_path, GenerateConfig(**QUICK, lr=2.0, checkpoint=str(checkpoint), resume=True), progress=False)


def test_checkpoint_is_not_a_pickle_of_arbitrary_objects(tiny_model_path: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    generate(tiny_model_path, GenerateConfig(**QUICK, checkpoint=str(checkpoint)), progress=False)
    state = torch.load(checkpoint, weights_only=True)  # must load without unpickling objects
    assert state["iteration"] == QUICK["iterations"]


def test_methods_bns_and_noise(tiny_model_path: Path) -> None:
    path = _with_metadata(tiny_model_path)
    bns = generate(path, GenerateConfig(**QUICK, method="bns"), progress=False)
    assert (bns.report["settings"]["sas"], bns.report["settings"]["prep"], bns.report["settings"]["odsl"]) == (False, False, False)
    noise = generate(path, GenerateConfig(images=50, method="noise"), progress=False)
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert noise.images.min() >= low and noise.images.max() <= high
    assert noise.report["normalization"]["clamped_fraction"] > 0
    assert "bns_loss" in noise.report["final"]


def test_dgh_images_are_clamped_to_the_valid_range(tiny_model_path: Path) -> None:
    result = generate(_with_metadata(tiny_model_path), GenerateConfig(**QUICK), progress=False)
    assert result.report["normalization"]["source"] == "metadata"
    assert result.images.min() >= -2.0 - 1e-6 and result.images.max() <= 2.0 + 1e-6


def test_normalization_without_metadata_is_inferred_and_clamps(tiny_model_path: Path) -> None:
    result = generate(tiny_model_path, GenerateConfig(**QUICK), progress=False)
    norm = result.report["normalization"]
    assert norm["source"] == "inferred" and norm["clamped"] is True and norm["inference"]["confidence"]
    low, high = np.array(norm["low"]).reshape(1, -1, 1, 1), np.array(norm["high"]).reshape(1, -1, 1, 1)
    assert np.all(result.images >= low - 1e-6) and np.all(result.images <= high + 1e-6)


def test_model_without_bn_is_refused_by_dgh_unless_asked(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folded = export_onnx(settle_bn(TinyConvBnRelu(), (3, 12, 12)), (3, 12, 12), tmp_path / "folded.onnx", keep_bn=False)
    with pytest.raises(UnsupportedModelError, match="BatchNormalization") as info:
        generate(folded, GenerateConfig(**QUICK, method="dgh"), progress=False)
    assert "TrainingMode.PRESERVE" in (info.value.hint or "")
    # Without BN and metadata the input range cannot be inferred: it must be given.
    with pytest.raises(InvalidInputError, match="normalisation of .* is unknown") as unknown:
        generate(folded, GenerateConfig(**QUICK, allow_no_bn=True), progress=False)
    assert "--preprocess" in (unknown.value.hint or "") and "--mean/--std" in (unknown.value.hint or "")
    config = GenerateConfig(**QUICK, allow_no_bn=True, preprocess="symmetric")
    assert generate(folded, config, progress=False).images.shape == (12, 3, 12, 12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=0), "--images"),
        (dict(batch_size=-1), "--batch-size"),
        (dict(method="zeroq"), "--method"),
        (dict(lr=0.0), "--lr"),
        (dict(factor=1.5), "--factor"),
        (dict(odsl_lambda=float("nan")), "--odsl-lambda"),
        (dict(mean=(0.5,)), "--mean and --std"),
        (dict(mean=(0.5,), std=(0.0,)), "--std"),
        (dict(resume=True), "--resume needs --checkpoint"),
        (dict(method="noise", sas=True), "--sas has no effect"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        GenerateConfig(**kwargs)


def test_evaluate_images_on_given_images(tiny_model_path: Path) -> None:
    images = np.random.default_rng(0).standard_normal((6, 3, 12, 12)).astype(np.float32)
    report = evaluate_images(load_model(tiny_model_path), images, batch_size=4)
    assert report["images"] == 6 and report["bns_loss"] > 0
    assert report["output_range"]["max"] >= report["output_range"]["mean"] >= report["output_range"]["min"]


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str):
    return CliRunner().invoke(main, ["-q", *args])


def test_cli_writes_images_preview_and_report(tiny_model_path: Path, tmp_path: Path) -> None:
    path = _with_metadata(tiny_model_path)
    out, preview, report = tmp_path / "imgs.npz", tmp_path / "grid.png", tmp_path / "report.json"
    result = _cli("generate", str(path), "-o", str(out), "--images", "6", "--iterations", "3", "--batch-size", "4",
                  "--preview", str(preview), "--json", str(report), "--seed", "7")
    assert result.exit_code == 0, result.output
    images, meta = load_images_npz(out)
    assert images.shape == (6, 3, 12, 12)
    assert meta["seed"] == 7 and meta["settings"]["iterations"] == 3 and "bns_loss" in meta["final"]
    assert json.loads(report.read_text())["method"] == "dgh"
    from PIL import Image

    with Image.open(preview) as sheet:
        assert sheet.size[0] > 12 * 3


def test_cli_json_to_stdout(tiny_model_path: Path, tmp_path: Path) -> None:
    result = _cli("generate", str(tiny_model_path), "-o", str(tmp_path / "imgs.npz"), "--images", "4",
                  "--iterations", "2", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["images"] == 4 and report["normalization"]["source"] == "inferred"


def test_cli_refuses_model_without_bn_with_recipe(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folded = export_onnx(settle_bn(TinyConvBnRelu(), (3, 12, 12)), (3, 12, 12), tmp_path / "folded.onnx", keep_bn=False)
    out = tmp_path / "imgs.npz"
    result = _cli("generate", str(folded), "-o", str(out), "--method", "dgh")
    assert result.exit_code == 2
    assert "error:" in result.output and "TrainingMode.PRESERVE" in result.output and "--method procedural" in result.output
    assert "Traceback" not in result.output and not out.exists()
    unknown = _cli("generate", str(folded), "-o", str(out), "--method", "noise", "--images", "4")
    assert unknown.exit_code == 2 and "--preprocess" in unknown.output and not out.exists()
    assert _cli("generate", str(folded), "-o", str(out), "--method", "noise", "--images", "4",
                "--preprocess", "unit").exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "0"], "--images 0 is not a positive integer"),
        (["--method", "zeroq"], "--method 'zeroq'"),
        (["--odsl-lambda", "-1"], "--odsl-lambda"),
        (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "--mean has 2 values but the model input has 3 channels"),
        (["--mean", "abc", "--std", "1"], "--mean 'abc'"),
        (["--resume"], "--resume needs --checkpoint"),
    ],
)
def test_cli_bad_options_exit_2(tiny_model_path: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "imgs.npz"
    result = _cli("generate", str(tiny_model_path), "-o", str(out), "--iterations", "1", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "hint:" in result.output
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_unavailable_exit_2(tiny_model_path: Path, tmp_path: Path) -> None:
    result = _cli("generate", str(tiny_model_path), "-o", str(tmp_path / "x.npz"), "--device", "cuda")
    assert result.exit_code == 2 and "CUDA" in result.output


def test_cli_unwritable_outputs_exit_2_before_work(tiny_model_path: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "imgs.npz"
    result = _cli("generate", str(tiny_model_path), "-o", str(missing))
    assert result.exit_code == 2 and "does not exist" in result.output
    result = _cli("generate", str(tiny_model_path), "-o", str(tiny_model_path))
    assert result.exit_code == 2 and "input" in result.output
    result = _cli("generate", str(tiny_model_path), "-o", str(tmp_path / "a.npz"), "--preview", str(tmp_path / "a.npz"))
    assert result.exit_code == 2 and "same file" in result.output
    assert not (tmp_path / "a.npz").exists()


def test_train_view_gather_matches_per_image_slice_flip_crop() -> None:
    """The gathered crop equals the plain per-image slice + flip (values and gradients)."""
    from onnxdgh.generation.prep import Preprocessor

    prep = Preprocessor(3, 10, 12, margin=4, sigma=1.25, enabled=True, low=None, high=None)
    canvas = torch.randn(16, 3, 14, 16, requires_grad=True)
    weights = torch.randn(16, 3, 10, 12)
    view = prep.train_view(canvas, torch.Generator().manual_seed(5))
    (view * weights).sum().backward()
    got_grad = canvas.grad.clone()
    canvas.grad = None

    generator = torch.Generator().manual_seed(5)
    smoothed = prep.smooth(canvas)
    flips = (torch.rand(16, generator=generator) < 0.5).tolist()
    tops = torch.randint(0, 5, (16,), generator=generator).tolist()
    lefts = torch.randint(0, 5, (16,), generator=generator).tolist()
    assert any(flips) and not all(flips)
    crops = []
    for i in range(16):
        image = smoothed[i, :, tops[i] : tops[i] + 10, lefts[i] : lefts[i] + 12]
        crops.append(image.flip(-1) if flips[i] else image)
    expected = torch.stack(crops)
    (expected * weights).sum().backward()
    assert torch.equal(view, expected)
    assert torch.equal(got_grad, canvas.grad)


def test_channels_last_is_the_same_computation(tiny_model_path: Path, tmp_path: Path) -> None:
    """NHWC vs NCHW: same images up to float rounding; the caller's module keeps its layout."""
    from onnxdgh.convert import to_torch
    from onnxdgh.generation.core import _Run

    loaded = load_model(tiny_model_path)
    nhwc = generate(loaded, GenerateConfig(**QUICK, seed=3, channels_last=True), progress=False)
    nchw = generate(loaded, GenerateConfig(**QUICK, seed=3, channels_last=False), progress=False)
    np.testing.assert_allclose(nhwc.images, nchw.images, rtol=0, atol=1e-3)
    assert nhwc.report["settings"]["channels_last"] is True and nchw.report["settings"]["channels_last"] is False

    torch_model = to_torch(loaded)
    weights = [p for p in torch_model._probe.parameters() if p.dim() == 4]
    assert weights
    run = _Run(torch_model, GenerateConfig(**QUICK, channels_last=True), None, None)
    assert all(p.is_contiguous() for p in weights)
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in run.model._probe.parameters() if p.dim() == 4)

    # a checkpoint does not depend on the layout: resuming with the other one is accepted
    ckpt = tmp_path / "ckpt.pt"
    generate(loaded, GenerateConfig(**QUICK, checkpoint=str(ckpt), channels_last=False), progress=False)
    generate(loaded, GenerateConfig(**QUICK, checkpoint=str(ckpt), resume=True, channels_last=True), progress=False)
    result = _cli("generate", str(tiny_model_path), "-o", str(tmp_path / "i.npz"), "--images", "4",
                  "--iterations", "2", "--no-channels-last", "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["channels_last"] is False


def test_flat_batch_moments_equal_per_layer_moments() -> None:
    from onnxdgh.generation.losses import flat_batch_moments

    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 5, 5, generator=generator) + 2.0, torch.randn(4, 6, generator=generator)]
    mean, var = flat_batch_moments(xs)
    expected = [batch_moments(x) for x in xs]
    torch.testing.assert_close(mean, torch.cat([m for m, _ in expected]), rtol=0, atol=0)
    torch.testing.assert_close(var, torch.cat([v for _, v in expected]), rtol=0, atol=0)


def test_per_image_moments_equal_var_mean() -> None:
    from onnxdgh.generation.losses import STD_EPS, per_image_moments

    x = (torch.randn(5, 3, 4, 6) * 0.2 + 7.0).requires_grad_(True)
    mean, std = per_image_moments(x)
    var_ref, mean_ref = torch.var_mean(x, dim=(2, 3), correction=0)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, torch.sqrt(var_ref + STD_EPS), rtol=1e-5, atol=1e-6)
    (got,) = torch.autograd.grad((mean.sum() + std.sum()), x)
    (expected,) = torch.autograd.grad((mean_ref.sum() + torch.sqrt(var_ref + STD_EPS).sum()), x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

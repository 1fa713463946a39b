"""Train a small Fashion-MNIST classifier and export it as a float ONNX sample with BN kept.

Usage::

    python tools/train_fashion_mnist.py --arch resnet8 --epochs 4 --seed 0 \\
        -o samples/fmnist_resnet8.onnx

Contract:

- Same arguments and same torch build -> same weights: seeded torch/numpy/random,
  seeded data order and augmentation, ``torch.use_deterministic_algorithms(True)``,
  two intra-op threads.
- Training augmentation is a random 28x28 crop of the image zero-padded by 2 pixels
  (padding is black, the data set's background) and a random horizontal flip; DGH
  mirrors these when it synthesises calibration images.
- Every convolution is followed by ``BatchNorm2d``; the exported graph keeps each one as
  an inference-mode ``BatchNormalization`` node (one output, ``training_mode`` 0 or
  absent) whose scale, bias, mean and variance are initializers, possibly behind an
  ``Identity`` node. The export is checked for that, and against the torch model.
- The output ``logits`` has no Softmax. The input is ``input`` of shape
  ``(batch, 1, 28, 28)`` in the normalised space ``(pixel / 255 - mean) / std``.
- The ONNX file is evaluated with onnxruntime on the full 10,000-image test split and
  its ``metadata_props`` carry ``input_mean``, ``input_std``, ``class_names`` (JSON
  lists), ``float_top1``, ``dataset``, ``training_command`` and ``arch``. The file is
  written atomically (temporary file in the same folder, then renamed).
"""

from __future__ import annotations

import os

# Two CPU-heavy processes share these cores; spinning OpenMP workers slow both a lot.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist  # noqa: E402  (sibling module, tools/ is not a package)

ARCHES = ("resnet8", "mobilenetv2", "resnet8-silu", "tv-mobilenetv2")
NUM_CLASSES = len(fashion_mnist.CLASS_NAMES)
CROP_PADDING = 2
EXPORT_OPSET = 17


@dataclass(frozen=True)
class TrainConfig:
    """One training run; every field is one command-line option."""

    arch: str
    epochs: int
    seed: int
    output: Path
    batch_size: int = 128
    max_lr: float = 0.1
    weight_decay: float = 5e-4
    threads: int = 2
    train_limit: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"--arch {self.arch!r}: choose one of {', '.join(ARCHES)}")
        if self.epochs < 1:
            raise ValueError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 2:
            raise ValueError(f"--batch-size {self.batch_size}: must be at least 2 (BN)")
        if self.max_lr <= 0 or self.weight_decay < 0:
            raise ValueError("--max-lr must be positive and --weight-decay non-negative")
        if self.threads < 1:
            raise ValueError(f"--threads {self.threads}: must be at least 1")
        if self.train_limit is not None and self.train_limit < self.batch_size:
            raise ValueError(f"--train-limit {self.train_limit}: below one batch")
        if self.output.suffix != ".onnx":
            raise ValueError(f"-o {self.output}: the output file must end in .onnx")


# --------------------------------------------------------------------------- models


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    # BN supplies the bias, so the conv has none (as in the torchvision models).
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """conv3x3-BN-act-conv3x3-BN plus shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, act: Callable[[], nn.Module]):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride), act(), *_conv_bn(cout, cout, 3)
        )
        self.shortcut: nn.Module = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNet8(nn.Module):
    """Stem 16ch, stages 16/32/64 (stride 1/2/2), one basic block each, GAP, Linear."""

    def __init__(self, act: Callable[[], nn.Module] = nn.ReLU):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, 16, 3), act())
        self.stages = nn.Sequential(
            BasicBlock(16, 16, 1, act),
            BasicBlock(16, 32, 2, act),
            BasicBlock(32, 64, 2, act),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN (linear)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            *_conv_bn(cin, hidden, 1),
            nn.ReLU6(),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU6(),
            *_conv_bn(hidden, cout, 1),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2Small(nn.Module):
    """MobileNetV2-style net sized for 28x28 inputs (resolutions 28 -> 14 -> 7)."""

    # (expansion, output channels, blocks, first stride)
    SETTINGS = ((4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1))

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(1, 16, 3), nn.ReLU6()]
        cin = 16
        for expand, cout, blocks, stride in self.SETTINGS:
            for index in range(blocks):
                layers.append(
                    InvertedResidual(cin, cout, stride if index == 0 else 1, expand)
                )
                cin = cout
        layers += [*_conv_bn(cin, 128, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


TV_WIDTH = 0.5
"""Width multiplier of the ``tv-mobilenetv2`` arch (torchvision's channel rounding to 8 applies)."""


def torchvision_mobilenet_v2() -> nn.Module:
    """torchvision's ``mobilenet_v2`` (width :data:`TV_WIDTH`, BN after every conv, ReLU6,
    dropout head) for one-channel 28x28 input: the stem takes 1 channel with stride 1
    (the usual small-image adaptation), so the resolutions run 28 -> 14 -> 7 -> 4 -> 2."""
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(width_mult=TV_WIDTH, num_classes=NUM_CLASSES)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(1, stem.out_channels, 3, stride=1, padding=1, bias=False)
    return model


def build_model(arch: str) -> nn.Module:
    """Return a freshly initialised model for ``arch`` (one of ``ARCHES``)."""
    if arch == "resnet8":
        return ResNet8(nn.ReLU)
    if arch == "resnet8-silu":
        return ResNet8(nn.SiLU)
    if arch == "mobilenetv2":
        return MobileNetV2Small()
    if arch == "tv-mobilenetv2":
        return torchvision_mobilenet_v2()
    raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHES)}")


# ---------------------------------------------------------------------- training


def seed_everything(seed: int, threads: int) -> None:
    """Seed every generator in play and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def augment(
    padded: torch.Tensor, index: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Random 28x28 crops of the padded images ``padded[index]``, each flipped with p=0.5."""
    count = index.numel()
    side = padded.shape[-1] - 2 * CROP_PADDING
    oy = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    ox = torch.randint(0, 2 * CROP_PADDING + 1, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    steps = torch.arange(side)
    rows = (oy[:, None] + steps)[:, :, None]
    cols = ox[:, None] + steps
    # A flipped crop reads its columns right to left.
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    crops = padded[index[:, None, None], 0, rows, cols]
    return crops[:, None, :, :].contiguous()


def evaluate_torch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], 1000):
            logits = model(images[start : start + 1000])
            correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct / images.shape[0]


def train(config: TrainConfig, log: Callable[[str], None]) -> tuple[nn.Module, float]:
    """Train a model per ``config``; return it (eval mode) and the training seconds."""
    seed_everything(config.seed, config.threads)
    train_u8, train_labels = fashion_mnist.load_split("train")
    if config.train_limit is not None:
        train_u8 = train_u8[: config.train_limit]
        train_labels = train_labels[: config.train_limit]
    test_u8, test_labels = fashion_mnist.load_split("test")

    # Pad in pixel space (black = 0), then normalise: the border is background.
    padded_u8 = np.pad(train_u8, ((0, 0),) + ((CROP_PADDING, CROP_PADDING),) * 2)
    padded = torch.from_numpy(fashion_mnist.normalize(padded_u8))
    labels = torch.from_numpy(train_labels)
    test_images = torch.from_numpy(fashion_mnist.normalize(test_u8))
    test_targets = torch.from_numpy(test_labels)

    model = build_model(config.arch)
    log(f"arch {config.arch}: {count_parameters(model):,} parameters")
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.max_lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = labels.shape[0] // config.batch_size  # drop the ragged batch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.max_lr,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
    )
    loss_fn = nn.CrossEntropyLoss()
    order_rng = np.random.default_rng(config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed)

    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        epoch_start = time.perf_counter()
        order = torch.from_numpy(order_rng.permutation(labels.shape[0]))
        total_loss = 0.0
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            inputs = augment(padded, index, aug_gen)
            loss = loss_fn(model(inputs), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
            if (step + 1) % 100 == 0:
                log(
                    f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} "
                    f"loss {total_loss / (step + 1):.4f} "
                    f"({time.perf_counter() - epoch_start:.0f} s)"
                )
        accuracy = evaluate_torch(model, test_images, test_targets)
        log(
            f"epoch {epoch + 1}/{config.epochs}: loss {total_loss / steps_per_epoch:.4f} "
            f"test top-1 {accuracy:.4f} ({time.perf_counter() - epoch_start:.1f} s)"
        )
    seconds = time.perf_counter() - started
    return model.eval(), seconds


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BN running statistics not counted)."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ export


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export ``model`` (eval mode) to ``path`` with every BatchNorm kept as a node.

    Both exporters fold BN into Conv by default. The TorchScript exporter keeps BN when
    constant folding is off; with ``TrainingMode.PRESERVE`` and an eval-mode model the
    nodes come out in inference mode (one output, ``training_mode`` 0).
    """
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        opset_version=EXPORT_OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def check_batchnorm_kept(proto: onnx.ModelProto, expected: int) -> list[str]:
    """Check every BN node is inference-mode with constant parameters; return notes.

    Raises ``RuntimeError`` naming the node when a BN is missing, in training mode, or
    has a parameter that is neither an initializer nor an Identity of one.
    """
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    identity_of = {
        node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"
    }
    bn_nodes = [node for node in graph.node if node.op_type == "BatchNormalization"]
    if len(bn_nodes) != expected:
        raise RuntimeError(
            f"export has {len(bn_nodes)} BatchNormalization nodes, the torch model "
            f"{expected}: BN was folded or dropped"
        )
    notes: list[str] = []
    for node in bn_nodes:
        training_mode = next(
            (a.i for a in node.attribute if a.name == "training_mode"), 0
        )
        if len(node.output) != 1 or training_mode != 0:
            raise RuntimeError(
                f"BatchNormalization {node.name!r} is in training mode "
                f"({len(node.output)} outputs, training_mode={training_mode})"
            )
        for name in node.input[1:]:
            if name in initializers:
                continue
            if identity_of.get(name) in initializers:
                notes.append(f"{node.name}: {name} is Identity({identity_of[name]})")
                continue
            raise RuntimeError(
                f"BatchNormalization {node.name!r}: parameter {name!r} is not constant"
            )
    return notes


def evaluate_onnx(path: Path, images: np.ndarray, labels: np.ndarray, threads: int) -> float:
    """Top-1 accuracy of the ONNX file at ``path`` under onnxruntime (CPU)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )
    correct = 0
    for start in range(0, images.shape[0], 500):
        (logits,) = session.run(["logits"], {"input": images[start : start + 500]})
        correct += int((logits.argmax(1) == labels[start : start + 500]).sum())
    return correct / images.shape[0]


def _json_floats(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def export_sample(
    model: nn.Module, config: TrainConfig, command: str, log: Callable[[str], None]
) -> float:
    """Export, verify, evaluate and annotate the sample; return its ONNX top-1."""
    test_u8, test_labels = fashion_mnist.load_split("test")
    test_images = fashion_mnist.normalize(test_u8)
    expected_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    output = config.output
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(
        prefix=f".{output.stem}.", suffix=".onnx.tmp", dir=output.parent
    )
    os.close(handle)
    tmp_path = Path(tmp_name)
    try:
        export_onnx(model, tmp_path)
        proto = onnx.load(str(tmp_path))
        onnx.checker.check_model(proto, full_check=True)
        for note in check_batchnorm_kept(proto, expected_bn):
            log(f"note: {note}")

        with torch.no_grad():
            reference = model(torch.from_numpy(test_images[:256])).numpy()
        session = ort.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])
        (onnx_logits,) = session.run(["logits"], {"input": test_images[:256]})
        max_diff = float(np.abs(onnx_logits - reference).max())
        log(f"max |onnxruntime - torch| on 256 test images: {max_diff:.2e}")
        if max_diff > 1e-3:
            raise RuntimeError(f"exported model disagrees with torch by {max_diff}")

        top1 = evaluate_onnx(tmp_path, test_images, test_labels, config.threads)
        onnx.helper.set_model_props(
            proto,
            {
                "input_mean": _json_floats(fashion_mnist.MEAN),
                "input_std": _json_floats(fashion_mnist.STD),
                "class_names": json.dumps(list(fashion_mnist.CLASS_NAMES)),
                "float_top1": f"{top1:.4f}",
                "dataset": "fashion-mnist",
                "training_command": command,
                "arch": config.arch,
            },
        )
        onnx.save(proto, str(tmp_path))
        tmp_path.chmod(0o644)  # mkstemp creates 0600; the sample is for everyone
        os.replace(tmp_path, output)
    finally:
        tmp_path.unlink(missing_ok=True)
    op_types = sorted({node.op_type for node in proto.graph.node})
    log(f"ops: {', '.join(op_types)}; {expected_bn} BatchNormalization nodes kept")
    return top1


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> TrainConfig:
    """Turn command-line arguments into a validated ``TrainConfig``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=ARCHES)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--max-lr", type=float, default=TrainConfig.max_lr)
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="train on the first N images only (smoke tests)",
    )
    args = parser.parse_args(argv)
    try:
        return TrainConfig(
            arch=args.arch,
            epochs=args.epochs,
            seed=args.seed,
            output=args.output,
            batch_size=args.batch_size,
            max_lr=args.max_lr,
            weight_decay=args.weight_decay,
            threads=args.threads,
            train_limit=args.train_limit,
        )
    except ValueError as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> int:
    """Train, export and evaluate one sample; print progress, accuracy and time."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(argv)
    command = shlex.join(["python", "tools/train_fashion_mnist.py", *argv])

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        model, seconds = train(config, log)
        top1 = export_sample(model, config, command, log)
    except fashion_mnist.FashionMnistMissingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size_kib = config.output.stat().st_size / 1024
    log(
        f"wrote {config.output} ({size_kib:.0f} KiB): onnxruntime test top-1 "
        f"{top1:.4f} on 10,000 images; training {seconds:.0f} s "
        f"({seconds / 60:.1f} min, {config.epochs} epochs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

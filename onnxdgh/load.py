"""Safe loading and canonicalisation of an ONNX image model: stage 1 of the pipeline.

Contract:
* :func:`load_model` reads a file without ever modifying it and refuses, with an
  :class:`~onnxdgh.errors.OnnxDghError` naming the problem and the fix, anything onnxdgh
  cannot work on: a missing/empty/truncated/non-ONNX file, a model failing the full
  ``onnx.checker``, external data that is missing or resolves outside the model's folder,
  an opset outside :data:`SUPPORTED_OPSETS`, more or fewer than one image input, an
  input that is not a float 4-D NCHW tensor, NaN in a constant, an infinity in a weight or
  BN statistic, or a BN variance below -epsilon (each tensor named).
* :func:`canonicalise` returns a graph computing the same function with Constant nodes
  turned into initializers, Identity nodes removed, shape-only computations folded into
  initializers (see below) and dead nodes/initializers dropped, so that every
  BatchNormalization's scale/bias/mean/var are initializers.
* Shape folding: a tensor computed only from constants and the ``Shape``/``Size`` of
  tensors whose shapes are known (the input pinned by ``--input-shape`` or static) is a
  constant; exports compute Reshape targets this way (``Shape -> Gather -> Unsqueeze ->
  Concat -> Reshape``) and those ops are not in any accelerator profile. The symbolic
  batch dimension is the one unknown allowed: a value that depends on it is folded only
  where it is a Reshape target, the batch entry becoming ``0`` (copy the data's batch
  dimension) or ``-1`` (the one inferred entry), so a dynamic-batch model stays dynamic.
  A value depending on any other unknown dimension is left as it is.
* :class:`LoadedModel` carries the canonical model and what later stages need: the
  input's name and C x H x W shape, whether the batch dimension is fixed, and every BN
  node's statistics (:class:`BatchNormInfo`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from . import graph as g
from .errors import ModelLoadError, SymbolicShapeError, UnsupportedModelError, exception_line
from .normalization import metadata_normalization

__all__ = [
    "SUPPORTED_OPSETS",
    "BatchNormInfo",
    "LoadedModel",
    "load_model",
    "load_model_proto",
    "canonicalise",
    "convert_opset",
    "make_batch_dynamic",
    "REEXPORT_RECIPE",
    "SHAPE_ARITHMETIC_OPS",
]

_LOG = logging.getLogger(__name__)

SUPPORTED_OPSETS = (11, 21)
"""Inclusive range of default-domain opsets the pipeline works at."""

OLDEST_CONVERTIBLE_OPSET = 7
"""Opsets from this one up to below :data:`SUPPORTED_OPSETS` are converted to
:data:`CONVERTED_OPSET` with ``onnx.version_converter``
(Upsample becomes Resize, BatchNormalization loses its old attributes), checked against the
original in onnxruntime."""

CONVERTED_OPSET = 13

REEXPORT_RECIPE = (
    "torch.onnx.export(model.eval(), example, 'model.onnx', dynamo=False, "
    "training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False, opset_version=17)"
)
"""The export call that keeps BatchNormalization nodes (the default export folds them)."""

_FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.DOUBLE: "float64"}


@dataclass(frozen=True)
class BatchNormInfo:
    """One BatchNormalization node and the statistics of its *input* (DGH's targets).

    ``mean`` and ``var`` are the node's ``input_mean`` / ``input_var`` initializers; the
    target standard deviation is ``sqrt(var)``. ``usable`` is False (with ``problem``
    saying why) when the statistics cannot serve as targets.
    """

    node_name: str
    input_name: str
    output_name: str
    scale: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    mean: np.ndarray = field(repr=False)
    var: np.ndarray = field(repr=False)
    epsilon: float
    usable: bool
    problem: str | None = None

    @property
    def channels(self) -> int:
        """Number of channels the node normalises."""
        return int(self.mean.shape[0])

    @property
    def std(self) -> np.ndarray:
        """Target standard deviation sqrt(var) (no epsilon, as the BN input's statistic)."""
        return np.sqrt(np.maximum(self.var, 0.0))


@dataclass(frozen=True)
class LoadedModel:
    """A validated, canonicalised model and the facts later stages rely on."""

    model: onnx.ModelProto = field(repr=False)
    source: str
    input_name: str
    input_shape: tuple[int, int, int]
    input_dtype: str
    batch_dim: int | str | None
    output_names: tuple[str, ...]
    opset: int
    bn_nodes: tuple[BatchNormInfo, ...]
    metadata: dict[str, str]
    canonicalisation: dict[str, int]
    as_written: onnx.ModelProto | None = field(default=None, repr=False)
    """The checked model before canonicalisation (Identity and Constant nodes kept; only a
    symbolic input shape pinned): what the validator's structural rules read."""

    @property
    def batch_fixed(self) -> bool:
        """True when the exported graph fixes the batch dimension (often to 1)."""
        return isinstance(self.batch_dim, int)

    @property
    def usable_bn_nodes(self) -> tuple[BatchNormInfo, ...]:
        """BN nodes whose statistics can serve as DGH targets."""
        return tuple(bn for bn in self.bn_nodes if bn.usable)

    def input_normalization(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel float32 (mean, std) from ``metadata_props``, if present and usable.

        Values map pixels in [0, 1] to the model's input: ``x = (pixel - mean) / std``. The
        keys read and the 0-255 detection are those of
        :func:`onnxdgh.normalization.metadata_normalization` (the one reader of them);
        :func:`onnxdgh.normalization.resolve_normalization` adds options, presets and inference.
        """
        found = metadata_normalization(self.metadata, self.input_shape[0])
        if found is None:
            return None
        return found[0].astype(np.float32), found[1].astype(np.float32)


# --------------------------------------------------------------------------- loading


def load_model(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    *,
    input_shape: tuple[int, int, int] | None = None,
    keep_as_written: bool = False,
) -> LoadedModel:
    """Read, check and canonicalise the ONNX model at ``path`` (never modified).

    ``input_shape`` (C, H, W) pins symbolic input dimensions (many OCR and detection
    exports leave height and width open); it must agree with any fixed dimension.
    ``keep_as_written`` also keeps the model before canonicalisation
    (:attr:`LoadedModel.as_written`, what the validator's rules read); off by default, as
    it holds a second copy of every weight.

    Raises:
        ModelLoadError: ``path`` is not a path (``str``, ``bytes`` or ``os.PathLike``), or
            the file cannot be read as a valid ONNX model (non-finite weights included).
        UnsupportedModelError: a valid model onnxdgh cannot work on.
    """
    src = _model_path(path)
    if not src.exists():
        raise ModelLoadError(f"model file {src} does not exist", "check the path")
    if src.is_dir():
        raise ModelLoadError(f"model path {src} is a folder, not an .onnx file", "give the path of the .onnx file")
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"model file {src} cannot be read: {exc.strerror}", "check its permissions") from exc
    if not data:
        raise ModelLoadError(f"model file {src} is empty", "re-export or re-download the model")
    model = _parse(data, src)
    _resolve_external_data(model, src.parent.resolve(), src)
    return _finish(model, str(src), input_shape, keep_as_written)


def _model_path(path: object) -> Path:
    """``path`` as a ``Path``: ``str``, ``bytes`` (file-system encoding) or ``os.PathLike``."""
    if isinstance(path, onnx.ModelProto):
        raise ModelLoadError(
            "load_model takes the path of an .onnx file, not a ModelProto",
            "use onnxdgh.load_model_proto(model) for a model in memory",
        )
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ModelLoadError(
            f"load_model takes a file path (str, bytes or os.PathLike), not {type(path).__name__}",
            "pass the path of the .onnx file, e.g. load_model('model.onnx')",
        )
    try:
        return Path(os.fsdecode(path))
    except (TypeError, ValueError) as exc:  # a PathLike returning neither str nor bytes, or a NUL byte
        raise ModelLoadError(f"{path!r} is not a usable file path ({exc})", "pass the path of the .onnx file") from exc


def load_model_proto(
    model: onnx.ModelProto,
    source: str = "<memory>",
    *,
    input_shape: tuple[int, int, int] | None = None,
    keep_as_written: bool = False,
) -> LoadedModel:
    """Check and canonicalise an in-memory model (a copy; ``model`` is not modified).

    ``input_shape`` and ``keep_as_written`` as for :func:`load_model`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in _all_tensors(copy.graph):
        if uses_external_data(tensor):
            raise ModelLoadError(
                f"tensor {tensor.name} of {source} keeps its data in an external file",
                "load the model from its file with onnxdgh.load_model(path)",
            )
    return _finish(copy, source, input_shape, keep_as_written)


def _parse(data: bytes, src: Path) -> onnx.ModelProto:
    hint = "give a complete .onnx file, e.g. re-export it with torch.onnx.export"
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError (a generic Exception subclass)
        raise ModelLoadError(
            f"{src} is not an ONNX model (it does not parse as ONNX protobuf; truncated or another format)",
            hint,
        ) from exc
    if model.ir_version <= 0 or not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelLoadError(f"{src} is not an ONNX model (no IR version or no graph nodes)", hint)
    bad = _non_utf8_text(model)
    if bad is not None:
        raise ModelLoadError(f"{src} is damaged: the name {bad!r} is not UTF-8 text", hint)
    return model


def _non_utf8_text(model: onnx.ModelProto) -> bytes | None:
    """The first name or metadata string that is not UTF-8, if any.

    protobuf hands such a string field back as ``bytes`` (not ``str``), and the checker
    does not always refuse it; later stages would put the bytes into reports.
    """
    graph = model.graph
    texts: list[object] = [value.name for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)]
    for node in graph.node:
        texts += [node.name, node.op_type, node.domain, *node.input, *node.output]
    texts += [entry.domain for entry in model.opset_import]
    texts += [text for entry in model.metadata_props for text in (entry.key, entry.value)]
    return next((text for text in texts if isinstance(text, bytes)), None)


def _all_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    attrs = (attr for node in graph.node for attr in node.attribute)
    return [*graph.initializer, *(a.t for a in attrs if a.type == onnx.AttributeProto.TENSOR)]


def _resolve_external_data(model: onnx.ModelProto, base: Path, src: Path) -> None:
    for tensor in _all_tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        try:
            info = ExternalDataInfo(tensor)
        except ValueError as exc:  # an offset or length that is not a non-negative integer
            raise ModelLoadError(
                f"tensor {tensor.name} of {src} has malformed external data fields ({exc})",
                "re-save the model: onnx.save_model(model, path, save_as_external_data=True)",
            ) from exc
        location = Path(info.location)
        if "\0" in info.location:  # no file name holds one; resolve() would raise ValueError
            raise ModelLoadError(
                f"tensor {tensor.name} of {src} names external data {info.location!r} with a NUL byte",
                "re-save the model: onnx.save_model(model, path, save_as_external_data=True)",
            )
        target = (base / location).resolve()
        if location.is_absolute() or not target.is_relative_to(base):
            raise ModelLoadError(
                f"tensor {tensor.name} of {src} points to external data {info.location!r} outside the model's folder",
                "keep external data files beside the .onnx file; onnxdgh refuses paths that leave its folder",
            )
        try:
            size = target.stat().st_size if target.is_file() else None
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise ModelLoadError(
                f"external data file {info.location!r} for tensor {tensor.name} of {src} cannot be read: {exc.strerror}",
                "keep external data files beside the .onnx file under their saved names",
            ) from exc
        if size is None:
            raise ModelLoadError(
                f"external data file {info.location!r} for tensor {tensor.name} of {src} is missing",
                f"copy {info.location} next to {src.name}",
            )
        end = (info.offset or 0) + (info.length or 0)
        if info.length is not None and end > size:
            raise ModelLoadError(
                f"external data file {info.location!r} is shorter than tensor {tensor.name} needs",
                "the external data file is truncated; copy it again",
            )
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"external data of {src} cannot be read: {exc}", "check the data files beside the model") from exc


def _check_initializer_data(model: onnx.ModelProto, source: str) -> None:
    """Every initializer holds the data its type and dims declare.

    The checker does not compare the size of ``raw_data`` with the dims (and shape
    inference stops at an op it does not know), so a damaged file would fail later, in
    whichever stage first reads the tensor. ``to_array`` on raw data is a view: cheap.
    """
    for tensor in model.graph.initializer:
        try:
            g.to_array(tensor)
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(
                f"initializer {tensor.name} of {source} does not hold the data its type and shape declare ({exc})",
                "the file is damaged: re-export the model",
            ) from exc


def convert_opset(model: onnx.ModelProto, version: int, reason: str) -> onnx.ModelProto:
    """``model`` at opset ``version`` by ``onnx.version_converter`` (metadata kept), IR version
    raised to what that opset needs; refused naming ``reason`` when an adapter is missing."""
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises bare RuntimeErrors on unsupported adapters
        raise UnsupportedModelError(
            f"the model cannot be converted to opset {version} ({reason}): {exception_line(exc)}",
            f"re-export the model at opset {version}",
        ) from exc
    converted.ir_version = max(converted.ir_version, 10 if version >= 21 else 7)
    return converted


def _check_conversion(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    source: str,
    opset: int,
    input_name: str,
    batch_dim: int | str | None,
    chw: tuple[int, int, int],
) -> None:
    """Refuse a version conversion that changed what the model computes (one random input,
    onnxruntime)."""
    from .runtime import make_session  # onnxruntime is imported only when a model needs this

    batch = batch_dim if isinstance(batch_dim, int) else 1
    image = np.random.default_rng(0).uniform(-1.0, 1.0, (batch, *chw)).astype(np.float32)
    try:
        outputs = [make_session(model).run(None, {input_name: image})
                   for model in (original, converted)]
    except Exception as exc:  # noqa: BLE001 -- onnxruntime's errors share no base class
        raise UnsupportedModelError(
            f"{source} uses opset {opset}; its conversion to opset {CONVERTED_OPSET} could not "
            "be checked in "
            f"onnxruntime ({exception_line(exc)})",
            f"re-export the model with opset_version={CONVERTED_OPSET} or later",
        ) from exc
    for before, after in zip(*outputs):
        before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
        atol = 1e-5 * max(1.0, np.abs(before).max(initial=0.0))
        if before.shape != after.shape or not np.allclose(before, after, rtol=1e-4, atol=atol):
            raise UnsupportedModelError(
                f"{source} uses opset {opset}; onnx's version converter changed its outputs on the "
                f"way to opset {CONVERTED_OPSET}",
                f"re-export the model with opset_version={CONVERTED_OPSET} or later",
            )


def _pin_input_shape(image: onnx.ValueInfoProto, shape: tuple[int, int, int], source: str) -> None:
    """Write ``shape`` into the symbolic C/H/W dims of ``image``; refuse a conflict."""
    if len(shape) != 3 or any(int(v) <= 0 for v in shape):
        raise UnsupportedModelError(
            f"input shape {shape} is not C x H x W with positive sizes", "give it as e.g. --input-shape 3x48x192"
        )
    dims = image.type.tensor_type.shape.dim
    if len(dims) != 4:
        return  # the rank check that follows reports it
    for axis, dim, value in zip("CHW", list(dims)[1:], shape):
        if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != value:
            raise UnsupportedModelError(
                f"input {image.name!r} of {source} has {axis} = {dim.dim_value}, not {value} as requested",
                "leave out --input-shape or give the model's own size",
            )
        dim.Clear()
        dim.dim_value = int(value)


def _finish(
    model: onnx.ModelProto, source: str, input_shape: tuple[int, int, int] | None, keep_as_written: bool = False
) -> LoadedModel:
    opset = g.opset_version(model)
    if opset is None:
        raise ModelLoadError(f"{source} imports no default ONNX opset", "re-export the model with opset_version=17")
    low, high = SUPPORTED_OPSETS
    converted_from = None
    if OLDEST_CONVERTIBLE_OPSET <= opset < low and not keep_as_written:
        # Exports older than opset 11 (Upsample, BN's old attributes) are converted the
        # way the refusal's hint would tell the user to, and checked against the original
        # in onnxruntime (_check_conversion) once the input shape is known.
        original, converted_from = model, opset
        model = convert_opset(model, CONVERTED_OPSET,
                              f"{source} uses opset {opset}, older than {low}")
        _LOG.info("%s: converted from opset %d to %d", source, opset, CONVERTED_OPSET)
        opset = CONVERTED_OPSET
    if not low <= opset <= high:
        raise UnsupportedModelError(
            f"{source} uses opset {opset}; onnxdgh supports opsets {low} to {high}",
            f"convert it: onnx.version_converter.convert_version(model, 17), or re-export with opset_version=17",
        )
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        # ValueError: the checker's C++ side meets an unknown tensor data type or a name
        # that is not UTF-8 (UnicodeDecodeError) -- a damaged file either way.
        raise ModelLoadError(
            f"{source} fails the ONNX checker: {exception_line(exc)}",
            "re-export the model; `python -c \"import onnx; onnx.checker.check_model('model.onnx', full_check=True)\"` shows the details",
        ) from exc
    _check_initializer_data(model, source)

    inputs = [value for value in model.graph.input if value.name in set(g.graph_input_names(model.graph))]
    if len(inputs) != 1:
        names = ", ".join(value.name for value in inputs) or "none"
        raise UnsupportedModelError(
            f"{source} has {len(inputs)} graph inputs ({names}); onnxdgh needs exactly one image input",
            "export the model with a single N x C x H x W image input",
        )
    image = inputs[0]
    tensor_type = image.type.tensor_type
    dims = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else []
    if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
        # Some exporters write -1 or 0 for a dynamic batch; make it a proper symbol.
        dims[0].Clear()
        dims[0].dim_param = "batch"
    if input_shape is not None:
        _pin_input_shape(image, input_shape, source)
    if not image.type.HasField("tensor_type") or tensor_type.elem_type not in _FLOAT_TYPES:
        raise UnsupportedModelError(
            f"input {image.name!r} of {source} is not a float tensor",
            "onnxdgh needs a float32 N x C x H x W image input; export without integer preprocessing",
        )
    if len(dims) != 4:
        raise UnsupportedModelError(
            f"input {image.name!r} of {source} has rank {len(dims)}; onnxdgh needs a 4-D N x C x H x W image",
            "export the model with an NCHW image input",
        )
    chw: list[int] = []
    for axis, dim in zip("CHW", dims[1:]):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            raise SymbolicShapeError(
                f"input {image.name!r} of {source} has a symbolic {axis} dimension",
                "pin it with --input-shape CxHxW (e.g. 3x48x192), or export with a fixed size",
            )
        chw.append(int(dim.dim_value))
    if chw[0] > 16 and chw[2] <= 16:
        raise UnsupportedModelError(
            f"input {image.name!r} of {source} looks channels-last ({'x'.join(map(str, chw))}); onnxdgh needs NCHW",
            "export the model with a channels-first N x C x H x W input",
        )
    # the batch dimension is a positive size or (made above) a symbol
    batch_dim = int(dims[0].dim_value) if dims[0].HasField("dim_value") else dims[0].dim_param

    canon, counts = canonicalise(model)
    _check_weights(canon, source)
    if converted_from is not None:
        _check_conversion(original, canon, source, converted_from, image.name, batch_dim,
                          (chw[0], chw[1], chw[2]))
        counts["opset_converted_from"] = converted_from
    try:
        canon = onnx.shape_inference.infer_shapes(canon, check_type=True, strict_mode=False, data_prop=True)
    except Exception as exc:  # shape inference failure on a checked model is unusual
        _LOG.warning("shape inference failed after canonicalisation: %s", exc)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    loaded = LoadedModel(
        model=canon,
        source=source,
        input_name=image.name,
        input_shape=(chw[0], chw[1], chw[2]),
        input_dtype=_FLOAT_TYPES[tensor_type.elem_type],
        batch_dim=batch_dim,
        output_names=tuple(g.graph_output_names(canon.graph)),
        opset=opset,
        bn_nodes=tuple(_batch_norms(canon)),
        metadata=metadata,
        canonicalisation=counts,
        as_written=model if keep_as_written else None,
    )
    _LOG.info("loaded %s: input %s %s, opset %d, %d BN nodes (%d usable)", source, image.name,
              "x".join(map(str, chw)), opset, len(loaded.bn_nodes), len(loaded.usable_bn_nodes))
    return loaded


# --------------------------------------------------------------------- canonicalise


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside subgraphs (If/Loop/Scan bodies)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                for inner in sub.node:
                    names.update(inner.input)
                names.update(_subgraph_reads(sub))
    return names


def canonicalise(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Return an equivalent model with Constants as initializers, no Identity, no dead nodes.

    Shape-only computations are folded into initializers where the shapes they read are
    known (module docstring). The input model is not modified. Returns ``(model, counts)``
    where ``counts`` says how many constants were lifted, identities removed, shape values
    folded and dead nodes/initializers dropped.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    counts = {"constants_lifted": 0, "identities_removed": 0, "shape_values_folded": 0, "dead_nodes_removed": 0,
              "unused_initializers_removed": 0}
    outputs = set(g.graph_output_names(graph))

    # Constant -> initializer (a Constant that is itself a graph output stays a node).
    lifted = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            value = g.constant_value(node)
            if value is not None:
                g.add_initializer(graph, node.output[0], value)
                lifted.append(node)
    g.remove_nodes(graph, lifted)
    counts["constants_lifted"] = len(lifted)

    # Identity elimination: consumers read the Identity's input directly.
    graph_inputs = {value.name for value in graph.input}
    producers = g.producer_map(graph)
    removed = []
    for node in list(graph.node):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            continue
        src, dst = node.input[0], node.output[0]
        if dst in outputs:
            # Keep the graph output's name: rename the producer's output instead, when the
            # source is a plain node output that nothing else must see under its old name.
            producer = producers.get(src)
            if producer is None or src in outputs or src in graph_inputs:
                continue
            g.rename_output(graph, src, dst)
            g.replace_input_uses(graph, src, dst)
            producers[dst] = producer
        else:
            g.replace_input_uses(graph, dst, src)
        removed.append(node)
    g.remove_nodes(graph, removed)
    counts["identities_removed"] = len(removed)

    # Shape-only subgraphs -> initializers; the nodes they leave unread die just below.
    g.topological_sort(graph)
    counts["shape_values_folded"] = _fold_shape_values(out)

    # Dead nodes: nothing on a path to a graph output needs them.
    needed = set(outputs) | _subgraph_reads(graph)
    live = []
    for node in reversed(list(graph.node)):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
    live_ids = {id(node) for node in live}  # live keeps the node objects, and so their ids, alive
    dead = [node for node in graph.node if id(node) not in live_ids]
    g.remove_nodes(graph, dead)
    counts["dead_nodes_removed"] = len(dead)

    used = {name for node in graph.node for name in node.input} | outputs | _subgraph_reads(graph)
    unused = [init.name for init in graph.initializer if init.name not in used]
    g.remove_initializers(graph, unused)  # with their graph-input entries
    counts["unused_initializers_removed"] = len(unused)
    names_alive = used | {name for node in graph.node for name in node.output}
    g.keep_only(graph.value_info, lambda value: value.name in names_alive)
    g.topological_sort(graph)
    return out, counts


# -------------------------------------------------------------------- shape folding

SHAPE_ARITHMETIC_OPS: frozenset[str] = frozenset(
    {
        "Abs", "Add", "Cast", "Ceil", "Concat", "ConstantOfShape", "Div", "Equal", "Expand", "Flatten", "Floor",
        "Gather", "Greater", "Identity", "Less", "Max", "Min", "Mod", "Mul", "Neg", "Not", "Range", "ReduceMax",
        "ReduceMin", "ReduceProd", "ReduceSum", "Reshape", "Slice", "Sqrt", "Squeeze", "Sub", "Tile", "Transpose",
        "Unsqueeze", "Where",
    }
)
"""Ops that may sit between ``Shape``/``Size`` and the value's consumer in a folded subgraph
(deterministic, no subgraphs, evaluated exactly by ``onnx.reference``)."""

_SHAPE_OPS = ("Shape", "Size")
_PROBE_BATCHES = (1, 2, 5)
"""Batch sizes the shape values are evaluated at: an entry equal to the batch in each is the batch."""
_MAX_FOLDED_ELEMENTS = 4096
"""Larger results (e.g. a ConstantOfShape of an activation's size) stay computed: shapes are small."""
_MAX_FOLD_ROUNDS = 4
"""A folded Reshape target lets shape inference see through that Reshape; later rounds fold what follows."""

Dims = tuple[int | str | None, ...]


def _known_shapes(graph: onnx.GraphProto) -> dict[str, Dims]:
    """Each tensor's dims from an inferred graph: an int, a symbol (``dim_param``) or None."""
    shapes: dict[str, Dims] = {init.name: tuple(int(d) for d in init.dims) for init in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
            continue
        shapes.setdefault(value.name, tuple(
            int(dim.dim_value) if dim.HasField("dim_value") else (dim.dim_param or None)
            for dim in tensor_type.shape.dim
        ))
    return shapes


def _batch_symbol(graph: onnx.GraphProto) -> str | None:
    """The symbolic batch dimension of the one graph input, if it has one."""
    names = g.graph_input_names(graph)
    if len(names) != 1:
        return None
    for value in graph.input:
        if value.name == names[0]:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_param") and dims[0].dim_param:
                return str(dims[0].dim_param)
    return None


def _shape_value(node: onnx.NodeProto, dims: Dims, batch: str | None, batch_value: int) -> np.ndarray:
    """What a Shape/Size node outputs when the batch symbol takes ``batch_value``."""
    concrete = [batch_value if (batch is not None and dim == batch) else int(dim) for dim in dims]  # type: ignore[arg-type]
    if node.op_type == "Size":
        return np.array(int(np.prod(concrete, dtype=np.int64)), np.int64)
    start, end = g.attribute(node, "start", 0), g.attribute(node, "end")
    # Python slicing clamps and wraps negative bounds exactly as Shape-15's start/end do.
    return np.array(concrete[start : None if end is None else int(end)], np.int64)  # type: ignore[arg-type]


def _evaluate_shape_values(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], targets: list[str], shapes: dict[str, Dims],
    batch: str | None, batch_value: int,
) -> list[np.ndarray] | None:
    """``targets``' values with the batch symbol set to ``batch_value``; None if evaluation fails."""
    from onnx.reference import ReferenceEvaluator

    inits = g.initializer_map(model.graph)
    feeds: list[onnx.TensorProto] = []
    compute: list[onnx.NodeProto] = []
    for node in nodes:
        if node.op_type in _SHAPE_OPS:
            value = _shape_value(node, shapes[node.input[0]], batch, batch_value)
            feeds.append(numpy_helper.from_array(value, node.output[0]))
        else:
            compute.append(node)
    read = {name for node in compute for name in node.input if name}
    feeds.extend(inits[name] for name in sorted(read) if name in inits)
    sub = helper.make_graph(compute, "shape_values", [], [onnx.ValueInfoProto(name=name) for name in targets],
                            initializer=feeds)
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
    try:
        return [np.asarray(value) for value in ReferenceEvaluator(sub_model).run(None, {})]
    except Exception as exc:  # an op the reference runtime rejects: leave the graph computing it
        _LOG.info("shape values could not be evaluated (%s); they stay computed", exc)
        return None


def _batch_free_reshape_target(
    values: list[np.ndarray], data_dims: Dims | None, batch: str, allowzero: bool
) -> np.ndarray | None:
    """A constant Reshape target equal to ``values`` at every batch size, or None.

    ``values`` are the target evaluated at the probe batches (:data:`_PROBE_BATCHES`). An
    entry that changes with the batch becomes 0 (copy the data input's dimension) where it
    is the batch and the data's dimension at that position is the batch; at most one other
    changing entry becomes -1 (inferred from the element count, which the graph makes
    consistent).
    """
    first = values[0]
    if first.ndim != 1 or any(v.shape != first.shape for v in values) or not np.issubdtype(first.dtype, np.integer):
        return None
    stacked = np.stack(values)
    target = first.astype(np.int64)
    inferred: list[int] = []
    for index in np.flatnonzero(np.any(stacked != first, axis=0)):
        is_batch = all(int(v) == probe for v, probe in zip(stacked[:, index], _PROBE_BATCHES))
        copies_batch = data_dims is not None and index < len(data_dims) and data_dims[index] == batch
        if is_batch and copies_batch and not allowzero:
            target[index] = 0
        else:
            inferred.append(int(index))
    if len(inferred) > 1 or (inferred and np.any(np.delete(target, inferred) == -1)):
        return None
    if inferred:
        target[inferred[0]] = -1
    return target


def _fold_shape_values(model: onnx.ModelProto) -> int:
    """Fold shape-only computations of a topologically sorted ``model`` in place; return the count.

    Readers outside the folded subgraph are rewired to new initializers; the subgraph's
    nodes are left for dead-node removal.
    """
    total = 0
    for _ in range(_MAX_FOLD_ROUNDS):
        folded = _fold_shape_round(model)
        total += folded
        if not folded:
            break
    return total


def _fold_shape_round(model: onnx.ModelProto) -> int:
    graph = model.graph
    if not any(node.op_type in _SHAPE_OPS for node in graph.node):
        return 0
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # without shapes nothing can be folded safely
        _LOG.info("shape inference failed; shape computations stay in the graph: %s", exc)
        return 0
    shapes = _known_shapes(inferred.graph)
    batch = _batch_symbol(graph)

    # The subgraph: Shape/Size of a known shape (the batch symbol allowed), then shape
    # arithmetic whose inputs are all constant or shape-derived.
    static = set(g.initializer_map(graph))
    derived: set[str] = set()
    subgraph: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        inputs = [name for name in node.input if name]
        if node.op_type in _SHAPE_OPS:
            dims = shapes.get(node.input[0])
            if dims is None or not all(isinstance(d, int) or (batch is not None and d == batch) for d in dims):
                continue
        elif node.op_type not in SHAPE_ARITHMETIC_OPS or not all(name in static for name in inputs):
            continue
        subgraph.append(node)
        static.update(node.output)
        if node.op_type in _SHAPE_OPS or any(name in derived for name in inputs):
            derived.update(node.output)

    inside = {id(node) for node in subgraph}
    consumers = g.consumer_map(graph)
    outputs = set(g.graph_output_names(graph))
    targets = [
        name for node in subgraph for name in node.output
        if name in derived and name not in outputs and any(id(user) not in inside for user in consumers.get(name, []))
    ]
    if not targets:
        return 0
    producers = g.producer_map(graph)
    needed: set[int] = set()
    stack = list(targets)
    while stack:
        producer = producers.get(stack.pop())
        if producer is None or id(producer) in needed or id(producer) not in inside:
            continue
        needed.add(id(producer))
        if producer.op_type not in _SHAPE_OPS:
            stack.extend(name for name in producer.input if name)
    nodes = [node for node in subgraph if id(node) in needed]
    uses_batch = batch is not None and any(
        batch in shapes[node.input[0]] for node in nodes if node.op_type in _SHAPE_OPS
    )
    probes = _PROBE_BATCHES if uses_batch else _PROBE_BATCHES[:1]
    runs = [_evaluate_shape_values(model, nodes, targets, shapes, batch, probe) for probe in probes]
    if any(run is None for run in runs):
        return 0

    taken = g.names_in_use(graph)
    folded = 0
    for position, name in enumerate(targets):
        values = [run[position] for run in runs]  # type: ignore[index]
        readers = [user for user in consumers[name] if id(user) not in inside]
        if values[0].size > _MAX_FOLDED_ELEMENTS:
            continue
        replacements: dict[int, np.ndarray] = {}
        if all(np.array_equal(values[0], value) for value in values[1:]):
            replacements = {id(user): values[0] for user in readers}
        else:  # depends on the batch: only a Reshape target can say "the batch" as a constant
            for user in readers:
                is_target = user.op_type == "Reshape" and [i for i, n in enumerate(user.input) if n == name] == [1]
                target = None
                if is_target and batch is not None:
                    allowzero = bool(g.attribute(user, "allowzero", 0))
                    target = _batch_free_reshape_target(values, shapes.get(user.input[0]), batch, allowzero)
                if target is None:
                    break
                replacements[id(user)] = target
            if len(replacements) != len(readers):
                _LOG.info("shape value %s depends on the batch size where no constant can say so; left computed", name)
                continue
        made: dict[bytes, str] = {}
        for user in readers:
            value = replacements[id(user)]
            key = value.dtype.str.encode() + repr(value.shape).encode() + value.tobytes()
            if key not in made:
                made[key] = g.unique_name(taken, f"{name}_folded")
                g.add_initializer(graph, made[key], value)
            for index, input_name in enumerate(user.input):
                if input_name == name:
                    g.set_node_input(user, index, made[key])
        folded += 1
    return folded


# ------------------------------------------------------------------- weight checks

_WEIGHT_READERS = frozenset(
    {
        "BatchNormalization", "Conv", "ConvTranspose", "Gemm", "GroupNormalization", "InstanceNormalization",
        "LayerNormalization", "MatMul", "PRelu",
    }
)
"""Ops whose constant inputs are weights or statistics: an infinity there is never meant.
(Elsewhere +-inf is legitimate: an open Clip bound, an attention mask.)"""


def _check_weights(model: onnx.ModelProto, source: str) -> None:
    """Refuse NaN in any float constant, +-inf in a weight or BN statistic, and a BN
    variance below -epsilon (sqrt(var + epsilon) would be NaN): each makes every image
    and every quantized value NaN, so no later stage can do anything useful with it."""
    readers = g.consumer_map(model.graph)
    for init in model.graph.initializer:
        if init.data_type not in _FLOAT_TYPES:
            continue
        values = g.to_array(init)
        if values.size == 0 or np.all(np.isfinite(values)):
            continue
        users = readers.get(init.name, [])
        weight_users = [node for node in users if node.op_type in _WEIGHT_READERS]
        nans = int(np.count_nonzero(np.isnan(values)))
        if not nans and not weight_users:
            continue
        node = (weight_users or users or [None])[0]
        where = f" read by {node.op_type} node {node.name!r}" if node is not None else ""
        what = f"NaN at {nans}" if nans else f"infinity at {int(np.count_nonzero(np.isinf(values)))}"
        raise ModelLoadError(
            f"tensor {init.name!r}{where} of {source} holds {what} of {values.size} values",
            "the weights are corrupt (or training diverged): re-export the model from a healthy checkpoint",
        )
    inits = g.initializer_map(model.graph)
    for index, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization" or len(node.input) < 5 or node.input[4] not in inits:
            continue
        epsilon = g.attribute(node, "epsilon", 1e-5)
        var = g.to_array(inits[node.input[4]]).astype(np.float64).reshape(-1)
        if var.size and float(var.min()) + epsilon < 0:
            name = g.node_label(node, index)
            raise ModelLoadError(
                f"tensor {node.input[4]!r} of BatchNormalization node {name!r} of {source} holds a negative variance "
                f"({float(var.min()):.4g} at channel {int(var.argmin())}, below -epsilon = {-epsilon:g}): "
                "the model computes NaN there",
                "the BN statistics are corrupt: re-export the model from a healthy checkpoint",
            )


# ---------------------------------------------------------------------- BN targets


def _batch_norms(model: onnx.ModelProto) -> list[BatchNormInfo]:
    inits = g.initializer_map(model.graph)
    found: list[BatchNormInfo] = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization":
            continue
        name = g.node_label(node, index)
        epsilon = g.attribute(node, "epsilon", 1e-5)
        missing = [role for role, tensor in zip(("scale", "bias", "mean", "var"), node.input[1:5]) if tensor not in inits]
        if missing:
            empty = np.zeros(0, np.float32)
            found.append(
                BatchNormInfo(name, node.input[0], node.output[0], empty, empty, empty, empty, epsilon, False,
                              f"{', '.join(missing)} not constant (computed in the graph)")
            )
            continue
        scale, bias, mean, var = (g.to_array(inits[t]).astype(np.float32).reshape(-1) for t in node.input[1:5])
        problem = None
        if g.attribute(node, "training_mode", 0) != 0 or len([o for o in node.output if o]) > 1:
            problem = "node is in training mode"
        elif np.any(var < 0):  # within -epsilon (load refuses less): the BN computes, the target is no std
            problem = "negative running variance"
        elif np.allclose(mean, 0.0) and np.allclose(var, 1.0):
            problem = "statistics are the initial values (mean 0, var 1): the BN was never trained"
        found.append(
            BatchNormInfo(name, node.input[0], node.output[0], scale, bias, mean, var, epsilon, problem is None, problem)
        )
    return found


# -------------------------------------------------------------------- batch handling


def make_batch_dynamic(loaded: LoadedModel) -> onnx.ModelProto | None:
    """A copy of the model that accepts any batch size, or None if it cannot be made safely.

    Many exports fix the batch dimension to 1. This sets the input's and outputs' batch
    dimension to the symbol ``batch``, drops stale intermediate shapes, and rewrites
    constant Reshape targets whose leading entry equals the fixed batch size to 0
    ("copy this dimension from the input"). The rewrite is accepted only if onnxruntime
    gives the same results for a batch of 3 as for the 3 images one at a time.
    """
    if not loaded.batch_fixed:
        return loaded.model
    fixed = int(loaded.batch_dim)  # type: ignore[arg-type]
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == fixed:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    g.clear_value_info(graph)
    inits = g.initializer_map(graph)
    for node in graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in inits:
            shape = g.to_array(inits[node.input[1]])
            if shape.ndim == 1 and shape.size > 0 and int(shape[0]) == fixed:
                new = shape.copy()
                new[0] = 0
                new_name = f"{node.input[1]}__batch_dynamic"
                if new_name not in inits:
                    inits[new_name] = g.add_initializer(graph, new_name, new.astype(np.int64))
                node.input[1] = new_name
    try:
        from .runtime import make_session  # onnxruntime is imported only when a model needs this

        rng = np.random.default_rng(0)
        batch = rng.standard_normal((3, *loaded.input_shape)).astype(np.float32)
        single = make_session(loaded.model)
        together = make_session(model).run(None, {loaded.input_name: batch})
        alone = [single.run(None, {loaded.input_name: batch[i : i + 1]}) for i in range(3)]
        for index, result in enumerate(together):
            expected = np.concatenate([run[index] for run in alone], axis=0)
            if result.shape != expected.shape or not np.allclose(result, expected, rtol=1e-4, atol=1e-4):
                return None
    except Exception as exc:  # any failure means the rewrite is not safe; callers fall back
        _LOG.info("batch dimension could not be made dynamic: %s", exc)
        return None
    return model


def attribute_summary(node: onnx.NodeProto) -> str:
    """A short ``key=value`` rendering of a node's attributes (for messages)."""
    parts = []
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        parts.append(f"{attr.name}={value}")
    return ", ".join(parts)

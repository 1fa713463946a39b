"""Fuzz cases for tools/fuzz.py: seed files and the hypothesis strategies that mutate them.

Contract: :func:`make_seeds` builds the valid inputs every case starts from (a tiny
Conv-BN-ReLU float model written with ``onnx.helper``, calibration images, labels and a
profile; the quantized seed model is made by the harness with ``onnxdgh quantize``).
:func:`case_strategy` is a hypothesis strategy of :class:`Case` objects: the files of one
case (name -> bytes, pristine) and the command line to run on them. Everything here is
deterministic given hypothesis's draws and imports only onnx, numpy and hypothesis (no
torch), so the supervisor stays light.

Output names every case may use are ``out.*`` files, the empty folder ``sub`` and the
missing folder ``missing``; files written by a run are the files of the case folder that
were not in :attr:`Case.files`.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Case", "Seeds", "make_seeds", "tiny_float_model", "case_strategy", "baseline_cases", "COMMANDS", "SUBDIR"]

INPUT_SHAPE = (3, 8, 8)
CLASSES = 3
SUBDIR = "sub"
"""An empty folder present in every case (an output named after it is a folder)."""

COMMANDS = ("inspect", "validate", "generate", "quantize")


@dataclass(frozen=True, repr=False)
class Seeds:
    """The valid inputs every case mutates."""

    float_model: onnx.ModelProto
    quant_model: onnx.ModelProto
    images: np.ndarray
    labels: np.ndarray
    profile: dict

    def __repr__(self) -> str:  # hypothesis prints the strategy's arguments
        return "Seeds(tiny Conv-BN-ReLU float and quantized models, images, labels, profile)"


@dataclass
class Case:
    """One fuzz case: pristine input files, the onnxdgh arguments, what was mutated."""

    command: str
    args: list[str]
    files: dict[str, bytes]
    mutations: list[str] = field(default_factory=list)
    output_options: dict[str, str] = field(default_factory=dict)
    """Output option -> path, for the exit-0 "output exists" check (``-o`` only)."""


# --------------------------------------------------------------------------- seeds


def tiny_float_model(*, width: int = 4, seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-ReLU x2, global pool, Gemm: the smallest float model with real BN statistics.

    Input ``input`` of shape batch x 3 x 8 x 8 (batch symbolic), output ``logits`` batch x 3,
    opset 17, normalisation recorded in ``metadata_props`` like an onnxdgh-ready export.
    """
    rng = np.random.default_rng(seed)
    channels = INPUT_SHAPE[0]
    inits: list[TensorProto] = []

    def add(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def bn(prefix: str, n: int) -> list[str]:
        return [
            add(f"{prefix}.scale", rng.uniform(0.5, 1.5, n)),
            add(f"{prefix}.bias", rng.normal(0, 0.1, n)),
            add(f"{prefix}.mean", rng.normal(0, 0.5, n)),
            add(f"{prefix}.var", rng.uniform(0.2, 2.0, n)),
        ]

    nodes = [
        helper.make_node("Conv", ["input", add("conv0.w", rng.normal(0, 0.3, (width, channels, 3, 3))),
                                  add("conv0.b", rng.normal(0, 0.1, width))], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", *bn("bn0", width)], ["n0"], name="bn0", epsilon=1e-5),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", add("conv1.w", rng.normal(0, 0.3, (width, width, 3, 3)))], ["c1"],
                         name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", *bn("bn1", width)], ["n1"], name="bn1", epsilon=1e-5),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", add("fc.w", rng.normal(0, 0.5, (CLASSES, width))),
                                  add("fc.b", rng.normal(0, 0.1, CLASSES))], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxdgh-fuzz")
    model.ir_version = 8
    helper.set_model_props(model, {"input_mean": "[0.5, 0.5, 0.5]", "input_std": "[0.25, 0.25, 0.25]"})
    onnx.checker.check_model(model, full_check=True)
    return model


def make_seeds(quant_model: onnx.ModelProto) -> Seeds:
    """The seed files; ``quant_model`` is :func:`tiny_float_model` quantized by onnxdgh."""
    rng = np.random.default_rng(1)
    # 8 images: quantize holds back 20 % (at least 4) for its verdict and refuses fewer than 8
    images = rng.normal(0, 1, (8, *INPUT_SHAPE)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 8).astype(np.int64)
    profile = json.loads(resources.files("onnxdgh").joinpath("profiles/generic-pot-int8.json").read_text())
    return Seeds(tiny_float_model(), quant_model, images, labels, profile)


# --------------------------------------------------------------------------- byte level

BYTE_MUTATIONS = ("truncate", "flip", "insert", "delete", "empty", "text", "random")


@st.composite
def byte_mutation(draw: st.DrawFn, data: bytes) -> tuple[bytes, str]:
    """Truncate, flip, insert, delete bytes of ``data`` or replace it outright."""
    kind = draw(st.sampled_from(BYTE_MUTATIONS))
    size = max(len(data), 1)
    if kind == "truncate":
        cut = draw(st.integers(0, size - 1))
        return data[:cut], f"bytes:truncate@{cut}"
    if kind == "flip":
        flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), min_size=1, max_size=8))
        out = bytearray(data)
        for pos, mask in flips:
            if pos < len(out):
                out[pos] ^= mask
        return bytes(out), f"bytes:flip x{len(flips)}"
    if kind == "insert":
        pos = draw(st.integers(0, size))
        blob = draw(st.binary(min_size=1, max_size=32))
        return data[:pos] + blob + data[pos:], f"bytes:insert@{pos}"
    if kind == "delete":
        pos = draw(st.integers(0, size - 1))
        span = draw(st.integers(1, 64))
        return data[:pos] + data[pos + span :], f"bytes:delete@{pos}+{span}"
    if kind == "empty":
        return b"", "bytes:empty"
    if kind == "text":
        return draw(st.sampled_from([b"hello\n", b"{}", b"ir_version: 8\n", b"\xff\xfe\x00"])), "bytes:text"
    return draw(st.binary(min_size=1, max_size=256)), "bytes:random"


# --------------------------------------------------------------------------- graph level

_DIM_VALUES = [0, 1, 2, 3, 4, 7, 8, 9, -1, 64, 100000]
_ATTR_INTS = [-(2**31), -3, -1, 0, 1, 2, 3, 5, 1000, 2**40]
_ATTR_FLOATS = [float("nan"), float("inf"), -1.0, 0.0, 1e-30, 1e30]
_EXT_LOCATIONS = ["w.bin", "./w.bin", "sub/../w.bin", "missing.bin", "../w.bin", "/etc/hostname", "/dev/zero",
                  "", ".", SUBDIR, "model.onnx", "w.bin\x00x", "a" * 300]
_OP_TYPES = ["Foo", "Conv", "Relu", "Add", "BatchNormalization", "Gemm", "MaxPool", "Identity", "Constant",
             "Loop", "If", "Shape", "Reshape", "QuantizeLinear", "DequantizeLinear", "Softmax", "Sigmoid", ""]
GRAPH_MUTATIONS = (
    "input_dims", "input_dtype", "output_shape", "init_dtype", "init_dims", "init_values", "remove_init",
    "attribute", "dangling_input", "rename_graph_input", "duplicate_output", "external_data", "opset",
    "ir_version", "op_type", "custom_domain", "remove_node", "duplicate_node", "cycle", "swap_nodes",
    "metadata", "extra_graph_input",
)


def _dim_update(dim: onnx.TensorShapeProto.Dimension, value: int | str) -> None:
    dim.Clear()
    if isinstance(value, str):
        dim.dim_param = value
    else:
        dim.dim_value = value


@st.composite
def graph_mutation(draw: st.DrawFn, model: onnx.ModelProto, files: dict[str, bytes]) -> str:
    """Apply one graph-level mutation to ``model`` in place; extra files go to ``files``."""
    kind = draw(st.sampled_from(GRAPH_MUTATIONS))
    graph = model.graph
    pick_node = lambda: graph.node[draw(st.integers(0, max(len(graph.node) - 1, 0)))] if graph.node else None  # noqa: E731
    pick_init = lambda: graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))] if graph.initializer else None  # noqa: E731
    if kind in ("input_dims", "output_shape"):
        values = graph.input if kind == "input_dims" else graph.output
        if not values:
            return f"graph:{kind}:none"
        dims = values[0].type.tensor_type.shape.dim
        action = draw(st.sampled_from(["set", "drop", "append", "clear"]))
        if action == "set" and len(dims):
            axis = draw(st.integers(0, len(dims) - 1))
            value = draw(st.sampled_from(_DIM_VALUES + ["h", "batch", ""]))
            _dim_update(dims[axis], value)
            return f"graph:{kind}:dim{axis}={value}"
        if action == "drop" and len(dims):
            del dims[draw(st.integers(0, len(dims) - 1))]
            return f"graph:{kind}:drop"
        if action == "clear":
            values[0].type.tensor_type.ClearField("shape")
            return f"graph:{kind}:no-shape"
        _dim_update(dims.add(), draw(st.sampled_from(_DIM_VALUES)))
        return f"graph:{kind}:append"
    if kind == "input_dtype":
        if not graph.input:
            return "graph:input_dtype:none"
        dtype = draw(st.integers(0, 25))
        graph.input[0].type.tensor_type.elem_type = dtype
        return f"graph:input_dtype={dtype}"
    if kind in ("init_dtype", "init_dims", "init_values", "remove_init"):
        tensor = pick_init()
        if tensor is None:
            return f"graph:{kind}:none"
        if kind == "init_dtype":
            dtype = draw(st.sampled_from([TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT8,
                                          TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING, 0, 30]))
            tensor.data_type = dtype
            return f"graph:init_dtype:{tensor.name}={dtype}"
        if kind == "init_dims":
            action = draw(st.sampled_from(["set", "drop", "append"]))
            if action == "set" and len(tensor.dims):
                axis = draw(st.integers(0, len(tensor.dims) - 1))
                tensor.dims[axis] = draw(st.sampled_from([0, 1, 2, 5, -1, 10**6]))
            elif action == "drop" and len(tensor.dims):
                del tensor.dims[-1]
            else:
                tensor.dims.append(draw(st.sampled_from([1, 2])))
            return f"graph:init_dims:{tensor.name}:{action}"
        if kind == "init_values":
            if tensor.data_location == TensorProto.EXTERNAL:  # never read external data here (it may be /dev/zero)
                return f"graph:init_values:{tensor.name}:external"
            try:
                array = numpy_helper.to_array(tensor).copy()
            except Exception:  # noqa: BLE001 - an earlier mutation broke it; leave it broken
                return f"graph:init_values:{tensor.name}:unreadable"
            if array.dtype.kind == "f":
                value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e30, -1e-30]))
            else:  # quantized weights, biases, zero points: their dtype's extremes
                info = np.iinfo(array.dtype) if array.dtype.kind in "iu" else None
                value = draw(st.sampled_from([0, 1, -1] + ([info.min, info.max] if info else [])))
                if info is not None and not info.min <= value <= info.max:
                    value = 0
            where = draw(st.sampled_from(["one", "all"]))
            flat = array.reshape(-1)
            if flat.size:
                if where == "all":
                    flat[:] = value
                else:
                    flat[draw(st.integers(0, flat.size - 1))] = value
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            return f"graph:init_values:{tensor.name}={value}:{where}"
        graph.initializer.remove(tensor)
        return f"graph:remove_init:{tensor.name}"
    if kind == "attribute":
        node = pick_node()
        if node is None:
            return "graph:attribute:none"
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "delete" and node.attribute:
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            node.attribute.remove(attr)
            return f"graph:attribute:{node.name}:del {attr.name}"
        name = (node.attribute[draw(st.integers(0, len(node.attribute) - 1))].name
                if action == "set" and node.attribute
                else draw(st.sampled_from(["pads", "strides", "kernel_shape", "dilations", "group", "epsilon",
                                           "axis", "transB", "alpha", "momentum", "auto_pad", "bogus"])))
        value = draw(st.one_of(
            st.sampled_from(_ATTR_INTS),
            st.lists(st.sampled_from(_ATTR_INTS), max_size=6),
            st.sampled_from(_ATTR_FLOATS),
            st.sampled_from(["SAME_UPPER", "VALID", "", "x"]),
        ))
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept)
        if isinstance(value, list) and not value:
            node.attribute.append(helper.make_attribute(name, [], attr_type=onnx.AttributeProto.INTS))
        else:
            node.attribute.append(helper.make_attribute(name, value))
        return f"graph:attribute:{node.name}:{name}={value!r}"
    if kind == "dangling_input":
        node = pick_node()
        if node is None or not node.input:
            return "graph:dangling_input:none"
        index = draw(st.integers(0, len(node.input) - 1))
        node.input[index] = draw(st.sampled_from(["missing_tensor", "", "logits", node.output[0] if node.output else "x"]))
        return f"graph:dangling_input:{node.name}[{index}]={node.input[index]!r}"
    if kind == "rename_graph_input":
        if not graph.input:
            return "graph:rename_graph_input:none"
        graph.input[0].name = draw(st.sampled_from(["renamed", "", "c0", "logits", "conv0.w"]))
        return f"graph:rename_graph_input={graph.input[0].name!r}"
    if kind == "duplicate_output":
        action = draw(st.sampled_from(["graph_output", "node_output"]))
        if action == "graph_output" and graph.output:
            graph.output.append(copy.deepcopy(graph.output[0]))
            return "graph:duplicate_output:graph"
        if len(graph.node) >= 2:
            a, b = draw(st.lists(st.integers(0, len(graph.node) - 1), min_size=2, max_size=2, unique=True))
            if graph.node[a].output and graph.node[b].output:
                graph.node[b].output[0] = graph.node[a].output[0]
            return f"graph:duplicate_output:{graph.node[b].name}->{graph.node[a].output[0] if graph.node[a].output else ''}"
        return "graph:duplicate_output:none"
    if kind == "external_data":
        return _external_data(draw, model, files)
    if kind == "opset":
        action = draw(st.sampled_from(["version", "domain", "add", "remove"]))
        if action == "version" and model.opset_import:
            model.opset_import[0].version = draw(st.sampled_from([0, 1, 7, 10, 11, 13, 17, 19, 21, 22, 30, 10**6]))
            return f"graph:opset={model.opset_import[0].version}"
        if action == "domain" and model.opset_import:
            model.opset_import[0].domain = draw(st.sampled_from(["ai.onnx.ml", "com.microsoft", "x"]))
            return f"graph:opset_domain={model.opset_import[0].domain}"
        if action == "remove":
            del model.opset_import[:]
            return "graph:opset:removed"
        model.opset_import.append(helper.make_opsetid(draw(st.sampled_from(["", "ai.onnx.ml", "x"])), draw(st.integers(1, 20))))
        return "graph:opset:added"
    if kind == "ir_version":
        model.ir_version = draw(st.sampled_from([0, 1, 3, 6, 7, 9, 10, 11, 100]))
        return f"graph:ir_version={model.ir_version}"
    if kind == "op_type":
        node = pick_node()
        if node is None:
            return "graph:op_type:none"
        node.op_type = draw(st.sampled_from(_OP_TYPES))
        return f"graph:op_type:{node.name}={node.op_type}"
    if kind == "custom_domain":
        node = pick_node()
        if node is None:
            return "graph:custom_domain:none"
        node.domain = "custom.fuzz"
        if draw(st.booleans()):
            node.op_type = "FuzzOp"
        model.opset_import.append(helper.make_opsetid("custom.fuzz", 1))
        return f"graph:custom_domain:{node.name}:{node.op_type}"
    if kind == "remove_node":
        node = pick_node()
        if node is None:
            return "graph:remove_node:none"
        graph.node.remove(node)
        return f"graph:remove_node:{node.name}"
    if kind == "duplicate_node":
        node = pick_node()
        if node is None:
            return "graph:duplicate_node:none"
        graph.node.insert(draw(st.integers(0, len(graph.node))), copy.deepcopy(node))
        return f"graph:duplicate_node:{node.name}"
    if kind == "cycle":
        if len(graph.node) < 2:
            return "graph:cycle:none"
        a, b = sorted(draw(st.lists(st.integers(0, len(graph.node) - 1), min_size=2, max_size=2, unique=True)))
        if graph.node[a].input and graph.node[b].output:
            graph.node[a].input[0] = graph.node[b].output[0]
        return f"graph:cycle:{graph.node[a].name}<-{graph.node[b].name}"
    if kind == "swap_nodes":
        if len(graph.node) < 2:
            return "graph:swap_nodes:none"
        a, b = draw(st.lists(st.integers(0, len(graph.node) - 1), min_size=2, max_size=2, unique=True))
        first, second = copy.deepcopy(graph.node[a]), copy.deepcopy(graph.node[b])
        graph.node[a].CopyFrom(second)
        graph.node[b].CopyFrom(first)
        return f"graph:swap_nodes:{a}<->{b}"
    if kind == "metadata":
        key = draw(st.sampled_from(["input_mean", "input_std", "onnxdgh.profile", "onnxdgh"]))
        value = draw(st.sampled_from(["[0.5]", "[0.1, 0.2]", "[0, 0, 0]", "[-1, -1, -1]", "NaN", "[1e400]", "[]",
                                      "{", "null", '"x"', "[true]", "generic-pot-int8", "nope", "[[0.5]]"]))
        kept = [p for p in model.metadata_props if p.key != key]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
        return f"graph:metadata:{key}={value}"
    # extra_graph_input
    action = draw(st.sampled_from(["second_image", "initializer_as_input", "remove_inputs"]))
    if action == "remove_inputs":
        del graph.input[:]
    elif action == "second_image" and graph.input:
        extra = copy.deepcopy(graph.input[0])
        extra.name = "input2"
        graph.input.append(extra)
    elif graph.initializer:
        tensor = pick_init()
        graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return f"graph:extra_graph_input:{action}"


def _external_data(draw: st.DrawFn, model: onnx.ModelProto, files: dict[str, bytes]) -> str:
    """Move one initializer's data to an external file whose fields point anywhere."""
    graph = model.graph
    if not graph.initializer:
        return "graph:external_data:none"
    tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
    raw = tensor.raw_data if tensor.HasField("raw_data") else b""
    if not raw and tensor.data_location != TensorProto.EXTERNAL:
        try:
            raw = numpy_helper.to_array(tensor).tobytes()
        except Exception:  # noqa: BLE001 - a broken tensor keeps no payload
            raw = b""
    location = draw(st.sampled_from(_EXT_LOCATIONS))
    offset = draw(st.sampled_from([None, 0, 1, 4, 10**12, -1, "x"]))
    length = draw(st.sampled_from([None, len(raw), len(raw) + 1, 0, 10**12, -1, "x"]))
    payload = draw(st.sampled_from(["exact", "short", "empty", "none"]))
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
        tensor.ClearField(name)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
    if draw(st.booleans()):
        entry = tensor.external_data.add()
        entry.key, entry.value = draw(st.sampled_from(["checksum", "bogus", "location"])), "x"
    start = offset if isinstance(offset, int) and 0 <= offset < 10**6 else 0
    if payload != "none":
        body = raw if payload == "exact" else raw[: len(raw) // 2] if payload == "short" else b""
        files["w.bin"] = b"\0" * start + body
    return f"graph:external_data:{tensor.name}:loc={location!r}:off={offset}:len={length}:{payload}"


@st.composite
def model_file(draw: st.DrawFn, base: onnx.ModelProto, files: dict[str, bytes], name: str,
               mutations: list[str], *, mutate: bool = True) -> None:
    """Write ``base`` (or a graph- and/or byte-mutated copy) to ``files[name]``."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    if mutate:
        for _ in range(draw(st.integers(0, 3))):
            mutations.append(draw(graph_mutation(model, files)))
    data = model.SerializeToString()
    if mutate and (not mutations or draw(st.integers(0, 3)) == 0):
        data, text = draw(byte_mutation(data))
        mutations.append(text)
    files[name] = data


# --------------------------------------------------------------------------- data files

DATA_MUTATIONS = ("shape", "dtype", "values", "pickled", "key", "meta", "huge_header", "bad_header", "zip", "bytes",
                  "npy")


def _npz(arrays: dict[str, np.ndarray], *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    if allow_pickle:
        with zipfile.ZipFile(buffer, "w") as archive:
            for key, array in arrays.items():
                inner = io.BytesIO()
                np.save(inner, array, allow_pickle=True)
                archive.writestr(f"{key}.npy", inner.getvalue())
    else:
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _npy_with_header(header: str, payload: bytes = b"\0" * 64) -> bytes:
    """A .npy file with a hand-written header dict (numpy format 1.0)."""
    text = header.encode("latin1")
    pad = 16 - (10 + len(text) + 1) % 16
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


@st.composite
def array_file(draw: st.DrawFn, array: np.ndarray, key: str, mutations: list[str], *, mutate: bool = True,
               meta: bool = True) -> bytes:
    """An .npz (``key`` -> array, plus JSON ``meta``) or .npy file, valid or mutated."""
    arrays: dict[str, np.ndarray] = {key: array}
    if meta:
        arrays["meta"] = np.array(json.dumps({"seed": 0}))
    if not mutate or draw(st.integers(0, 4)) == 0:
        return _npz(arrays)
    kind = draw(st.sampled_from(DATA_MUTATIONS))
    label = f"data:{key}:{kind}"
    allow_pickle = False
    if kind == "shape":
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 9]), min_size=0, max_size=5)))
        arrays[key] = np.resize(array, shape).astype(array.dtype) if int(np.prod(shape)) else np.zeros(shape, array.dtype)
        label += f"={shape}"
    elif kind == "dtype":
        dtype = draw(st.sampled_from(["float16", "float64", "int8", "uint8", "int64", "bool", "complex64", "U3", "S3",
                                      "datetime64[s]", "f4,f4", ">f4"]))
        try:
            arrays[key] = array.astype(dtype)
        except (TypeError, ValueError):
            arrays[key] = np.zeros(array.shape, dtype)
        label += f"={dtype}"
    elif kind == "values":
        if array.dtype.kind == "f":
            value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38, -1e9, 2**40, -1]))
        else:  # labels: out-of-range class indices
            value = draw(st.sampled_from([-1, 3, 10**6, -(2**63), 2**62]))
        changed = array.astype(np.float64 if array.dtype.kind == "f" else np.int64).copy()
        changed.reshape(-1)[draw(st.integers(0, changed.size - 1)) if draw(st.booleans()) else slice(None)] = value
        arrays[key] = changed.astype(array.dtype) if array.dtype.kind == "f" else changed
        label += f"={value}"
    elif kind == "pickled":
        arrays[key] = np.array([{"a": 1}, None], dtype=object)
        allow_pickle = True
    elif kind == "key":
        arrays = {draw(st.sampled_from(["x", "arr_0", "labels", "images", "meta"])): array}
    elif kind == "meta":
        arrays["meta"] = draw(st.sampled_from([np.array("{"), np.array("[1, 2]"), np.array('"x"'), np.arange(3),
                                               np.array(b"{}"), np.array("null"), np.array(["{}", "{}"]),
                                               np.array({"a": 1}, dtype=object)]))
        allow_pickle = arrays["meta"].dtype == object
    elif kind == "huge_header":
        shape = draw(st.sampled_from([(10**8, 3, 8, 8), (2**62, 1, 1, 1), (4, 3, 8, 8), (-1, 3, 8, 8), (10**5, 3, 8)]))
        dtype = draw(st.sampled_from(["<f4", "<i8", "|O"]))
        return _npy_with_header(f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}"), label + f"={shape}"
    elif kind == "bad_header":
        header = draw(st.sampled_from(["{'descr': '<f4'}", "not a dict", "{'descr': 'xx', 'fortran_order': False, 'shape': (1,), }",
                                       "{'descr': '<f4', 'fortran_order': True, 'shape': (4, 3, 8, 8), }",
                                       "{'descr': '<f4', 'fortran_order': 1, 'shape': 'x', }", "__import__('os')"]))
        return _npy_with_header(header, array.tobytes()[:1024]), label
    elif kind == "zip":
        data = _npz(arrays)
        choice = draw(st.sampled_from(["truncate", "not_npy_member", "empty_zip", "nested"]))
        if choice == "truncate":
            data = data[: draw(st.integers(0, len(data) - 1))]
        else:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:
                if choice == "not_npy_member":
                    archive.writestr(f"{key}.npy", b"not numpy")
                elif choice == "nested":
                    archive.writestr(f"{key}.npy", data)
            data = buffer.getvalue()
        return data, f"{label}:{choice}"
    elif kind == "bytes":
        data, text = draw(byte_mutation(_npz(arrays)))
        return data, f"{label}:{text}"
    else:  # npy: the bare array, no container
        return _npy(arrays[key]), label
    try:
        return _npz(arrays, allow_pickle=allow_pickle), label
    except (TypeError, ValueError) as exc:  # a dtype numpy cannot save: the mutation is moot
        return _npz({key: array}), f"{label}:unsaveable({type(exc).__name__})"


def _data(draw: st.DrawFn, array: np.ndarray, key: str, mutations: list[str], *, mutate: bool, meta: bool) -> bytes:
    result = draw(array_file(array, key, mutations, mutate=mutate, meta=meta))
    if isinstance(result, tuple):
        data, label = result
        mutations.append(label)
        return data
    return result


@st.composite
def profile_file(draw: st.DrawFn, base: dict, mutations: list[str]) -> bytes:
    """A constraint-profile JSON with one key removed or set to a wrong value, or not JSON."""
    profile = copy.deepcopy(base)
    action = draw(st.sampled_from(["set", "remove", "add", "text"]))
    if action == "text":
        mutations.append("profile:text")
        return draw(st.sampled_from([b"{", b"[]", b"", b"null", b"\xff"]))
    key = draw(st.sampled_from(sorted(profile)))
    if action == "remove":
        profile.pop(key)
    elif action == "add":
        key = "bogus"
        profile[key] = 1
    else:
        profile[key] = draw(st.sampled_from([None, 0, -1, 64, 1e309, "x", "", [], [0], [-4], [3], ["signed"], [["Conv"]],
                                             {"a": 1}, True, [8, 8], ["Conv", "Foo"]]))
    mutations.append(f"profile:{action}:{key}")
    return json.dumps(profile).encode()


# --------------------------------------------------------------------------- options

def _output_path(draw: st.DrawFn, fresh: str, others: list[str], inputs: list[str], *, dash: bool = False) -> str:
    """Mostly a fresh ``out.*`` name; sometimes an alias of another output or an input, a folder, a missing folder."""
    choices = [fresh] * 6 + [SUBDIR, f"missing/{fresh}", f"./{fresh}"]
    for other in others:
        choices += [other, f"./{other}", f"{SUBDIR}/../{other}"]
    for name in inputs:
        choices += [name, f"./{name}"]
    if dash:
        choices += ["-"]
    return draw(st.sampled_from(choices))


_SHAPES = ["3x8x8", "3x8x8", "3x9x9", "1x8x8", "3x4x4", "0x8x8", "3x8", "abc", "3x-1x8", "3x1x1"]
_FLOATS_TEXT = ["0.5", "0.5,0.5,0.5", "0.1,0.2", "a", "nan", "inf", "0", "-1", "", ",", "1e400", "0.5,,0.5"]


def _maybe(draw: st.DrawFn, probability_in_8: int = 2) -> bool:
    return draw(st.integers(0, 7)) < probability_in_8


@st.composite
def case_strategy(draw: st.DrawFn, seeds: Seeds) -> Case:
    """A :class:`Case`: a command, its (mostly mutated) inputs and fuzzed options.

    Weights: about 40 % inspect, 36 % validate, 12 % generate, 12 % quantize; most
    generate/quantize cases die at loading (a mutated input), so the expensive ones are
    a few percent.
    """
    command = draw(st.sampled_from(["inspect"] * 10 + ["validate"] * 9 + ["generate"] * 3 + ["quantize"] * 3))
    files: dict[str, bytes] = {}
    mutations: list[str] = []
    args: list[str] = []
    outputs: dict[str, str] = {}
    taken: list[str] = []
    inputs = ["model.onnx"]

    def out(option: str, fresh: str, *, dash: bool = False) -> None:
        path = _output_path(draw, fresh, taken, inputs, dash=dash)
        args.extend([option, path])
        if path != "-":
            taken.append(path)
        outputs[option] = path

    if draw(st.integers(0, 9)) == 0:
        args.append("-q")
    args.append(command)
    if command == "validate":
        quantized = draw(st.integers(0, 3)) > 0
        draw(model_file(seeds.quant_model if quantized else seeds.float_model, files, "model.onnx", mutations,
                        mutate=draw(st.booleans())))
        args.append("model.onnx")
        if _maybe(draw, 5):
            draw(model_file(seeds.float_model, files, "ref.onnx", mutations, mutate=_maybe(draw, 3)))
            args += ["--reference", "ref.onnx"]
            inputs.append("ref.onnx")
        if _maybe(draw, 3):
            files["data.npz"] = _data(draw, seeds.images, "images", mutations, mutate=_maybe(draw, 5), meta=True)
            args += ["--data", "data.npz"]
            inputs.append("data.npz")
            if _maybe(draw, 3):
                files["labels.npy"] = _data(draw, seeds.labels, "labels", mutations, mutate=_maybe(draw, 5), meta=False)
                args += ["--labels", "labels.npy"]
                inputs.append("labels.npy")
        else:
            args += ["--random-images", draw(st.sampled_from(["2", "2", "1", "3", "0"]))]
        if _maybe(draw, 1):
            args += ["--batch-size", draw(st.sampled_from(["1", "2", "0", "-1"]))]
        if _maybe(draw, 2):
            if _maybe(draw, 4):
                files["profile.json"] = draw(profile_file(seeds.profile, mutations))
                args += ["--profile", "profile.json"]
                inputs.append("profile.json")
            else:
                args += ["--profile", draw(st.sampled_from(["generic-pot-int8", "strict-pot-int8", "pot-lowbit", "nope",
                                                            SUBDIR, "missing.json"]))]
        if _maybe(draw, 1):
            args += ["--min-sqnr", draw(st.sampled_from(["0", "100", "nan", "-inf"]))]
        if _maybe(draw, 1):
            args += ["--min-agreement", draw(st.sampled_from(["0", "0.5", "1", "2", "nan", "-1"]))]
        if _maybe(draw, 1):
            args += ["--top", draw(st.sampled_from(["0", "1", "-1"]))]
    else:
        # inspect: mostly mutated models; generate/quantize: half of them reach the (costly) work
        mutate = draw(st.integers(0, 3)) > 0 if command == "inspect" else draw(st.booleans())
        draw(model_file(seeds.float_model, files, "model.onnx", mutations, mutate=mutate))
        args.append("model.onnx")
    if command == "generate":
        out("-o", "out.npz")
        args += ["--images", draw(st.sampled_from(["2"] * 6 + ["1", "3", "0", "-1"])),
                 "--iterations", draw(st.sampled_from(["1"] * 6 + ["2", "0", "-1"])),
                 "--batch-size", draw(st.sampled_from(["2"] * 6 + ["1", "3", "0", "-1"]))]
        if _maybe(draw, 2):
            args += ["--method", draw(st.sampled_from(["dgh", "bns", "noise", "foo", ""]))]
        if _maybe(draw, 2):
            out("--preview", "out.png")
        if _maybe(draw, 1):
            out("--checkpoint", "out.ckpt")
            if _maybe(draw, 4):
                args.append("--resume")
        if _maybe(draw, 1):
            args += ["--mean", draw(st.sampled_from(_FLOATS_TEXT))]
        if _maybe(draw, 1):
            args += ["--std", draw(st.sampled_from(_FLOATS_TEXT))]
        for option, values in (("--lr", ["nan", "inf", "0", "-1", "1e30"]), ("--smoothing-sigma", ["0", "-1", "nan"]),
                               ("--crop-margin", ["0", "-1", "100"]), ("--odsl-lambda", ["nan", "-1", "0"]),
                               ("--factor", ["0", "2", "nan"]), ("--patience", ["0", "-1"]),
                               ("--optimizer", ["adam", "sgd"]), ("--scheduler", ["none", "x"]),
                               ("--stats-refresh", ["rerun", "x"])):
            if _maybe(draw, 1) and _maybe(draw, 4):
                args += [option, draw(st.sampled_from(values))]
        if _maybe(draw, 1):
            args.append(draw(st.sampled_from(["--allow-no-bn", "--no-sas", "--no-prep", "--no-odsl", "--no-channels-last"])))
    if command == "quantize":
        out("-o", "out.onnx")
        if _maybe(draw, 3):
            files["calib.npz"] = _data(draw, seeds.images, "images", mutations, mutate=_maybe(draw, 5), meta=True)
            args += ["--calib-data", "calib.npz"]
            inputs.append("calib.npz")
        else:
            args += ["--images", draw(st.sampled_from(["8"] * 6 + ["2", "1", "0"])), "--iterations", "1", "--batch-size", "4"]
            if _maybe(draw, 1):
                args += ["--method", draw(st.sampled_from(["noise", "bns", "x"]))]
            if _maybe(draw, 1):
                args += ["--mean", draw(st.sampled_from(_FLOATS_TEXT))]
        args += ["--rounding-iterations", draw(st.sampled_from(["1"] * 8 + ["0", "-1"]))]
        if _maybe(draw, 2):
            args += ["--weight-bits", draw(st.sampled_from(["8", "4", "2", "3", "16", "0"]))]
        if _maybe(draw, 2):
            args += ["--act-bits", draw(st.sampled_from(["8", "4", "2", "16"]))]
        if _maybe(draw, 1):
            args += ["--threshold", draw(st.sampled_from(["noclip", "mse", "x"]))]
        if _maybe(draw, 1):
            args.append(draw(st.sampled_from(["--per-tensor-weights", "--int4-types", "--bias-correction",
                                              "--shift-negative", "--optimize-rounding", "--no-validate"])))
        if _maybe(draw, 1):
            if _maybe(draw, 4):
                files["profile.json"] = draw(profile_file(seeds.profile, mutations))
                args += ["--profile", "profile.json"]
                inputs.append("profile.json")
            else:
                args += ["--profile", draw(st.sampled_from(["pot-lowbit", "strict-pot-int8", "nope"]))]
        if _maybe(draw, 1):
            out("--validation-report", "out.validation.json")
        if _maybe(draw, 1):
            args += [draw(st.sampled_from(["--min-sqnr", "--min-agreement"])), draw(st.sampled_from(["0", "0.5", "200", "nan"]))]
    if _maybe(draw, 2):
        out("--json", "out.json", dash=True)
    if _maybe(draw, 1):
        args += ["--input-shape", draw(st.sampled_from(_SHAPES))]
    return Case(command, args, files, mutations or ["none"], {k: v for k, v in outputs.items() if k == "-o"})


def baseline_cases(seeds: Seeds) -> list[Case]:
    """Each command once on the unmutated seeds with every output option: they must all exit 0.

    A run starts with these, so it always exercises the work itself (generation,
    quantization, validation), not only the loaders that most mutated inputs stop at.
    """
    model = seeds.float_model.SerializeToString()
    images = _npz({"images": seeds.images, "meta": np.array(json.dumps({"seed": 0}))})
    tiny = ["--images", "2", "--iterations", "1", "--batch-size", "2"]
    # The profile's floors judge real models; a random 4-class model on 4 held-out images
    # after one iteration may fall below them (exit 1), which is not what a baseline checks.
    tiny_quantize = ["--images", "8", "--iterations", "1", "--batch-size", "4", "--min-sqnr", "0", "--min-agreement", "0"]
    return [
        Case("inspect", ["inspect", "model.onnx", "--json", "out.json"], {"model.onnx": model}, ["baseline"]),
        Case("validate", ["validate", "model.onnx", "--reference", "ref.onnx", "--data", "data.npz", "--labels",
                          "labels.npy", "--json", "out.json"],
             {"model.onnx": seeds.quant_model.SerializeToString(), "ref.onnx": model, "data.npz": images,
              "labels.npy": _npy(seeds.labels)}, ["baseline"]),
        Case("generate", ["generate", "model.onnx", "-o", "out.npz", *tiny, "--preview", "out.png", "--json",
                          "out.json", "--checkpoint", "out.ckpt"], {"model.onnx": model}, ["baseline"],
             {"-o": "out.npz"}),
        Case("quantize", ["quantize", "model.onnx", "-o", "out.onnx", *tiny_quantize, "--rounding-iterations", "1", "--json",
                          "out.json"], {"model.onnx": model}, ["baseline"], {"-o": "out.onnx"}),
        Case("quantize", ["quantize", "model.onnx", "-o", "out.onnx", "--calib-data", "calib.npz", "--weight-bits", "4",
                          "--rounding-iterations", "1"], {"model.onnx": model, "calib.npz": images}, ["baseline"],
             {"-o": "out.onnx"}),
    ]

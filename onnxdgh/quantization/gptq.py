r"""Weight rounding that minimises each layer's output error on the calibration inputs (GPTQ).

Contract: :func:`gptq_rounding` takes a :class:`~onnxdgh.quantization.plan.ResolvedPlan`,
the float model it quantizes and calibration images, and returns the plan with new
integers for the per-channel weights of 2-D Conv and Gemm nodes; every scale, bias,
activation grid and every other constant is unchanged, so the emitted model has the same
structure and the same power-of-two scales. Layers it cannot treat (MatMul, ConvTranspose,
1-D/3-D Conv, ``auto_pad``, per-tensor weights) keep the integers the plan chose.

The objective. For a layer ``y = W x`` (``x``: one input patch, a column of im2col) and
fixed per-row steps ``s_o``, the expected squared output error of integers ``q`` is

.. math::
    E\,\|(W - s \odot q)\, x\|^2 = \sum_o (w_o - s_o q_o)^\top H\, (w_o - s_o q_o),
    \qquad H = E[x x^\top]

(uncentred: the mean of ``x`` is part of ``H``, so the error a constant input sees, which
kernel-sum-preserving rounding bounds, is one of the directions it weighs). GPTQ (Frantar
et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023; the Optimal Brain Quantization step of Frantar & Alistarh 2022)
rounds the columns of ``W`` one at a time and spreads each column's rounding error over
the columns not yet rounded along the inverse Hessian: with ``U`` the upper Cholesky
factor of ``H^{-1}``,

.. math::
    q_i = \mathrm{clip}(\mathrm{round}(w_i / s)),\quad
    e_i = (w_i - s\, q_i) / U_{ii},\quad
    w_j \leftarrow w_j - e_i U_{ij}\ (j > i).

Here the grid is the plan's (power-of-two, per output channel) and stays fixed; only the
integers move. ``H`` comes from the *float* model's layer inputs on the calibration images
(a depthwise Conv has one ``H`` per channel, a grouped Conv one per group), damped by
``damp * mean(diag H)`` so that a direction the images never excite costs a little too.
Columns whose input is always zero are rounded to nearest and pass nothing on. Columns are
taken in order of decreasing ``H_ii`` (GPTQ's "act order").
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import onnx

from .. import graph as g
from ..runtime import make_session, run_batched, with_extra_outputs
from . import thresholds as th
from .plan import ParamQuant, ResolvedPlan

__all__ = ["DEFAULT_DAMP", "DEFAULT_MAX_IMAGES", "gptq_integers", "input_moments", "gptq_rounding"]

_LOG = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01
"""Relative damping of ``H`` (GPTQ's ``percdamp``)."""
DEFAULT_MAX_IMAGES = 32
"""Calibration images the input moments are measured on (the first ones): the moments of a
conv layer average over every position of every image, so a few dozen images suffice."""
_IMAGES_PER_RUN = 4
_BLOCK = 64
"""Columns per lazy-update block of :func:`gptq_integers`."""


class _Layer:
    """A Conv/Gemm node whose weight :func:`gptq_rounding` can re-round."""

    def __init__(self, node: onnx.NodeProto, weight: np.ndarray) -> None:
        self.node, self.input, self.gemm = node, node.input[0], node.op_type == "Gemm"
        self.group = 1 if self.gemm else g.attribute(node, "group", 1)
        self.kernel = tuple(weight.shape[2:])
        self.strides = tuple(g.attribute(node, "strides", [1, 1]))  # type: ignore[arg-type]
        self.dilations = tuple(g.attribute(node, "dilations", [1, 1]))  # type: ignore[arg-type]
        self.pads = tuple(g.attribute(node, "pads", [0, 0, 0, 0]))  # type: ignore[arg-type]


def _supported(node: onnx.NodeProto, weight: np.ndarray) -> str | None:
    """Why ``node`` cannot be treated, or None."""
    if node.op_type == "Gemm":
        transposed = g.attribute(node, "transA", 0) or weight.ndim != 2
        return "Gemm with transposed input" if transposed else None
    if node.op_type != "Conv":
        return f"{node.op_type} is not re-rounded"
    if weight.ndim != 4:
        return "only 2-D convolutions are re-rounded"
    if g.attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "auto_pad SAME_* (pads not explicit)"
    return None


def _patches(x: Any, layer: _Layer) -> Any:
    """im2col of ``x`` (torch, N x C x H x W) for ``layer``: N x G x (C/G kh kw) x L."""
    import torch.nn.functional as F

    top, left, bottom, right = layer.pads
    if any(layer.pads):
        x = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(x, layer.kernel, dilation=layer.dilations, stride=layer.strides)
    return cols.reshape(cols.shape[0], layer.group, -1, cols.shape[-1])


def input_moments(
    model: onnx.ModelProto,
    images: np.ndarray,
    layers: dict[str, _Layer],
    *,
    input_name: str,
    fixed_batch: int | None = None,
) -> dict[str, np.ndarray]:
    """Uncentred second moments ``E[x x^T]`` of each layer's input patches on ``images``.

    Returns node name -> float64 array ``G x K x K`` (``G`` groups, ``K`` = weight columns
    of one output channel), averaged over images and positions.
    """
    import torch

    names = sorted({layer.input for layer in layers.values()} - {input_name})
    session = make_session(with_extra_outputs(model, names), optimize=True) if names else None
    sums: dict[str, Any] = {}
    count: dict[str, int] = {}
    with torch.no_grad():
        for start in range(0, images.shape[0], _IMAGES_PER_RUN):
            batch = np.ascontiguousarray(images[start : start + _IMAGES_PER_RUN], np.float32)
            values = {input_name: batch}
            if session is not None:
                outputs = run_batched(session, batch, batch_size=_IMAGES_PER_RUN, outputs=names, fixed_batch=fixed_batch)
                values.update(zip(names, outputs))
            for label, layer in layers.items():
                x = torch.from_numpy(np.ascontiguousarray(values[layer.input], np.float32))
                if layer.gemm:
                    cols = x.reshape(x.shape[0], -1).T.reshape(1, -1, x.shape[0])  # G=1, K, L
                    positions = x.shape[0]
                else:
                    patches = _patches(x, layer)  # N, G, K, L
                    cols = patches.permute(1, 2, 0, 3).reshape(layer.group, patches.shape[2], -1)
                    positions = cols.shape[-1]
                moment = torch.bmm(cols, cols.transpose(1, 2)).double()
                sums[label] = moment if label not in sums else sums[label] + moment
                count[label] = count.get(label, 0) + positions
    return {label: (sums[label] / count[label]).numpy() for label in sums}


def gptq_integers(
    rows: np.ndarray, scale: np.ndarray, hessian: np.ndarray, bits: int, *, damp: float = DEFAULT_DAMP
) -> np.ndarray:
    """Signed integers for ``rows`` (R x K, one output channel per row, step ``scale[r]``)
    that minimise ``sum_r (w_r - s_r q_r)^T H_r (w_r - s_r q_r)`` greedily (GPTQ).

    ``hessian``: ``K x K`` shared by every row, or ``R x K x K`` one per row. Returns int64
    ``R x K`` on the signed ``bits`` grid.
    """
    qmin, qmax, _ = th.grid(bits, True)
    w = np.array(rows, np.float64)
    step = np.asarray(scale, np.float64).reshape(-1, 1)
    shared = hessian.ndim == 2
    h = np.array(hessian, np.float64)
    h = h[None] if shared else h
    k = w.shape[1]
    diag = np.diagonal(h, axis1=1, axis2=2)
    dead = diag <= 0.0  # input always zero: rounding there changes nothing measured
    idx = np.arange(k)
    h[:, idx, idx] = np.where(dead, 1.0, diag)
    mean_diag = np.mean(np.where(dead, 0.0, diag), axis=1, keepdims=True)
    h[:, idx, idx] += damp * np.where(mean_diag > 0, mean_diag, 1.0)
    # Act order: columns by decreasing H_ii, per H (one permutation per row when each row has its own).
    order = np.argsort(-np.diagonal(h, axis1=1, axis2=2), axis=1, kind="stable")  # (1 or R) x K
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    w = np.take_along_axis(w, np.broadcast_to(order, w.shape), axis=1)
    dead_cols = np.take_along_axis(dead, order, axis=1)
    try:
        chol_inv = np.linalg.cholesky(np.linalg.inv(h))  # lower L with L L^T = H^-1
    except np.linalg.LinAlgError:  # numerically indefinite: nearest rounding is the safe answer
        return th.quantize_to_int(rows, step, bits, True)
    upper = np.swapaxes(chol_inv, 1, 2)  # U = L^T, upper, U^T U = H^-1 ... as GPTQ uses it
    ints = np.empty_like(w)
    # GPTQ's lazy batch updates: the columns of one block are rounded one by one, the rest
    # of the matrix gets the block's errors in one product (the same arithmetic, fewer passes).
    for begin in range(0, k, _BLOCK):
        end = min(k, begin + _BLOCK)
        errors = np.zeros((w.shape[0], end - begin))
        for i in range(begin, end):
            q = np.clip(np.rint(w[:, i] / step[:, 0]), qmin, qmax)
            ints[:, i] = q
            err = (w[:, i] - q * step[:, 0]) / upper[:, i, i]
            err = np.where(dead_cols[:, i], 0.0, err)
            errors[:, i - begin] = err
            w[:, i + 1 : end] -= err[:, None] * upper[:, i, i + 1 : end]  # a shared H broadcasts
        if end < k:
            if shared:
                w[:, end:] -= errors @ upper[0, begin:end, end:]
            else:
                w[:, end:] -= np.einsum("rb,rbk->rk", errors, upper[:, begin:end, end:])
    out = np.empty_like(ints)
    np.put_along_axis(out, np.broadcast_to(order, ints.shape), ints, axis=1)
    return out.astype(np.int64)


def gptq_rounding(
    resolved: ResolvedPlan,
    model: onnx.ModelProto,
    images: np.ndarray,
    *,
    input_name: str,
    max_images: int = DEFAULT_MAX_IMAGES,
    damp: float = DEFAULT_DAMP,
    fixed_batch: int | None = None,
) -> tuple[ResolvedPlan, dict[str, Any]]:
    """``resolved`` with the per-channel Conv/Gemm weights re-rounded by :func:`gptq_integers`.

    ``model`` is the float model ``resolved`` was planned on (node names and initializers
    match); ``images`` its calibration images (the first ``max_images`` are used);
    ``fixed_batch``: the model's fixed batch size, if any.
    Returns the new plan and a report (layers treated, layers skipped with the reason,
    the share of integers changed, seconds).
    """
    started = time.perf_counter()
    inits = g.initializer_map(model.graph)
    by_name = {node.name: node for node in model.graph.node if node.name}
    layers: dict[str, _Layer] = {}
    skipped: list[dict[str, str]] = []
    for item in resolved.params:
        if item.role != "weight":
            continue
        node = by_name.get(item.node)
        if node is None or item.tensor not in inits:
            continue
        weight = g.to_array(inits[item.tensor])
        reason = _supported(node, weight) if item.axis is not None else "per-tensor weight"
        output_axis = 0 if g.attribute(node, "transB", 0) else 1
        if reason is None and node.op_type == "Gemm" and item.axis != output_axis:
            reason = "Gemm weight quantized along its input axis"
        if reason is not None:
            skipped.append({"node": item.node, "reason": reason})
            continue
        layers[item.node] = _Layer(node, weight)
    moments = input_moments(model, images[:max_images], layers, input_name=input_name,
                            fixed_batch=fixed_batch) if layers else {}
    moments_s = time.perf_counter() - started
    params: list[ParamQuant] = []
    changed = total = 0
    for item in resolved.params:
        layer = layers.get(item.node) if item.role == "weight" else None
        if layer is None or item.node not in moments:
            params.append(item)
            continue
        value = g.to_array(inits[item.tensor]).astype(np.float64)
        rows = np.moveaxis(value, item.axis, 0)  # type: ignore[arg-type]
        h = moments[item.node]  # one per group: output channel o is in group o // (O / G)
        per_row = h[0] if len(h) == 1 else np.repeat(h, len(rows) // len(h), axis=0)
        scale = item.scale.astype(np.float64)
        ints = gptq_integers(rows.reshape(len(rows), -1), scale, per_row, item.bits, damp=damp)
        ints = np.moveaxis(ints.reshape(rows.shape), 0, item.axis)  # type: ignore[arg-type]
        changed += int(np.sum(ints != item.values))
        total += int(item.values.size)
        params.append(replace(item, values=ints.astype(item.values.dtype)))
    report = {
        "layers": len(moments),
        "skipped": skipped,
        "images": int(min(max_images, images.shape[0])),
        "integers_changed": changed / total if total else 0.0,
        "seconds": round(time.perf_counter() - started, 3),
        "moments_s": round(moments_s, 3),
    }
    _LOG.info("GPTQ rounding: %d layers, %.1f %% of the integers changed, %.1f s",
              report["layers"], 100 * report["integers_changed"], report["seconds"])
    return replace(resolved, params=tuple(params)), report

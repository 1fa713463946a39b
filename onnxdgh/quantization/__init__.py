"""Stage 4: hardware-friendly post-training quantization (HPTQ) to a power-of-two QDQ model.

One file per concern, mark-then-emit:

* ``fold``: BatchNormalization folding and op normalisation (Gemm alpha/beta, Div by a
  constant, Dropout);
* ``calibrate``: activation statistics (min, max, histogram) from the float model;
* ``thresholds``: power-of-two thresholds (no clipping, MSE search) and grids;
* ``plan``: the policies that mark tensors (``mark``) and choose their numbers (``resolve``);
* ``emit``: the one place that writes QuantizeLinear / DequantizeLinear nodes;
* ``api``: :func:`quantize`, :class:`QuantizeConfig`, :class:`QuantizeResult`.
"""

from __future__ import annotations

from .api import THRESHOLD_METHODS, QuantizeConfig, QuantizeResult, default_profile_name, quantize

__all__ = ["THRESHOLD_METHODS", "QuantizeConfig", "QuantizeResult", "default_profile_name", "quantize"]

"""The gate math, one function per path, and the one dispatcher that chooses between them.

Paths (``backend=`` on :class:`glasslstm.LSTM`, or the ``GLASSLSTM_BACKEND`` environment
variable; an explicit argument wins):

* ``"bptt"`` — :class:`~glasslstm.ops.bptt.LSTMLayerFunction`: the hand-derived backward
  through time with batched GEMMs. The default (``"auto"``).
* ``"loop"`` — :func:`~glasslstm.ops.loop.lstm_layer_loop`: a plain torch loop that autograd
  differentiates. Slower; use it for double backward or forward-mode AD.

Every path computes the same numbers (the tests hold them to float64 round-off against each
other, the NumPy reference and torch.nn.LSTM).
"""

from __future__ import annotations

import os

from glasslstm.ops.bptt import LSTMLayerFunction
from glasslstm.ops.loop import lstm_layer_loop

BACKENDS = ("auto", "bptt", "loop")
ENV_VAR = "GLASSLSTM_BACKEND"


def resolve_backend(backend: str | None = None) -> str:
    """The concrete path for ``backend`` (None: ``$GLASSLSTM_BACKEND``, else ``"auto"``)."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        where = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{where}={name!r} is not a glasslstm backend; use one of {BACKENDS}")
    return "bptt" if name == "auto" else name


def lstm_layer(backend: str, x, h0, c0, weights, batch_sizes, reverse: bool, record: bool):
    """Run one layer in one direction on ``backend`` (a name from :func:`resolve_backend`).

    ``weights`` is ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` (biases and ``w_hr`` may be None).
    Returns ``(y, h_n, c_n)`` and, when ``record``, also the activated gates (T, B, 4H) and the
    cell states (T, B, H), zero past each sequence's end.
    """
    if backend == "loop":
        return lstm_layer_loop(x, h0, c0, *weights, batch_sizes, reverse, record)
    return LSTMLayerFunction.apply(x, h0, c0, *weights, batch_sizes, reverse, record)

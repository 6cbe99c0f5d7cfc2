"""What the views of an Analysis share: cell choice, printable tokens, one colour scale.

No torch here (views work on the plain NumPy arrays of an
:class:`~glasslstm.inspection.analysis.Analysis`).
"""

from __future__ import annotations

import math

import numpy as np

from glasslstm.config import QUANTITIES  # noqa: F401  (i f g o in torch's order, then c h)

GATES = ("i", "f", "o")  # the sigmoid gates, values in [0, 1]


def resolve_layer(analysis, layer: int | None, quantity: str) -> int:
    """``layer`` (default: the last) after checking it and ``quantity`` against ``analysis``."""
    n_layers = analysis.num_layers
    layer = n_layers - 1 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})"
        )
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose from {', '.join(QUANTITIES)}")
    return layer


# The article's names, in plain English (shared by the terminal legend, HTML and PNG).
NAMES = {
    "f": "forget gate f_t",
    "i": "input gate i_t",
    "g": "new information N_t",
    "o": "output gate o_t",
    "c": "cell state C_t",
    "h": "hidden state H_t",
}
EXPLAIN = {
    "f": "how much of the cell state C_{t-1} is kept (1: keep all of it, 0: forget it)",
    "i": "how much of the new information N_t is written into the cell state",
    "g": "the new information N_t = tanh(...) that may be added to the cell state, in [-1, 1]",
    "o": "how much of the squashed cell state tanh(C_t) is let out as the hidden state H_t",
    "c": "the long-term memory: C_t = f_t * C_{t-1} + i_t * N_t (coloured by tanh(C_t))",
    "h": "the short-term memory and the layer's output: H_t = o_t * tanh(C_t)",
}


def printable(token: str) -> str:
    """One token as a short printable string: space as '␣', newline as '\\n', tab as '\\t'."""
    return "".join(
        "␣"
        if ch == " "
        else ch
        if ch.isprintable()
        else ch.encode("unicode_escape").decode("ascii")
        for ch in token
    )


def top_variance_cells(values: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` columns of ``values`` ``(T, size)`` with the largest variance over
    time, largest first (ties: lower index first)."""
    var = values.astype(np.float64).var(axis=0)
    order = np.lexsort((np.arange(var.size), -var))
    return [int(k) for k in order[:n]]


def colour_value(quantity: str, value: float) -> float:
    """The value as placed on its colour scale: gates in [0, 1] as they are, g and h clipped to
    [-1, 1], the cell state as tanh(c) (what the output gate sees; c itself is unbounded)."""
    if not math.isfinite(value):
        return 0.0
    if quantity == "c":
        return math.tanh(value)
    lo = 0.0 if quantity in GATES else -1.0
    return min(1.0, max(lo, value))


# Diverging (c, g, h): blue for -1, white for 0, red for +1 (ColorBrewer RdBu).
# Sequential (i, f, o): white for 0, dark green for 1 (ColorBrewer Greens).
NEG, MID, POS = (33, 102, 172), (247, 247, 247), (178, 24, 43)
SEQ0, SEQ1 = (247, 252, 245), (0, 109, 44)


def _mix(a, b, w):
    return tuple(round(x + (y - x) * w) for x, y in zip(a, b))


def rgb(quantity: str, value: float) -> tuple[int, int, int]:
    """The colour (0-255 RGB) of one value of one quantity (see :func:`colour_value`)."""
    v = colour_value(quantity, value)
    if quantity in GATES:
        return _mix(SEQ0, SEQ1, v)
    return _mix(MID, POS, v) if v >= 0 else _mix(MID, NEG, -v)


def is_dark(colour: tuple[int, int, int]) -> bool:
    """Whether white text reads better than black on this background."""
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b < 140

"""What the views of an Analysis share: cell choice, printable tokens, one colour scale.

No torch here (views work on the plain NumPy arrays of an
:class:`~glasslstm.inspection.analysis.Analysis`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    "c": "the long-term memory: C_t = f_t * C_{t-1} + i_t * N_t",
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


def informative_cells(analysis, layer: int, n: int) -> list[int]:
    """The ``n`` cells of ``layer`` whose hidden state H_t varies most over the text, most
    first: cells that switch between values at events. (Ranking by the cell state's variance
    picks the integrators, whose C_t only drifts to large values; H_t = o tanh(C_t) is bounded
    and moves where the cell shows something.) With a projection, H_t has fewer entries than
    the cells; then the cell state's tanh is ranked instead."""
    h = analysis.values("h", layer)
    values = h if h.shape[1] == analysis.hidden_size else np.tanh(analysis.values("c", layer))
    return top_variance_cells(values, n)


# ------------------------------------------------------------------------------ colours
#
# Every view colours a value by where it lies on a diverging scale around the value that means
# "nothing": 0 for N_t, C_t and H_t, 0.5 for the gates (half open). The scale's half-width is a
# robust one: the ROBUST-th percentile of |value - centre| over what is shown, so one extreme
# value does not wash everything else out; values beyond it take the end colours.

ROBUST = 98.0  # percentile of |value - centre| that takes the full colour
CENTRE = {"i": 0.5, "f": 0.5, "o": 0.5, "g": 0.0, "c": 0.0, "h": 0.0}
# The state colours (N_t, C_t, H_t): ColorBrewer RdBu, blue (-) white (0) red (+).
NEG, MID, POS = (33, 102, 172), (247, 247, 247), (178, 24, 43)
# The gates: ColorBrewer PuOr, purple (shut, 0) white (0.5) orange (open, 1).
SHUT, HALF, OPEN = (84, 39, 136), (247, 247, 247), (179, 88, 6)


@dataclass(frozen=True)
class Scale:
    """A diverging colour scale: ``centre`` takes the middle colour, ``centre ± half`` the end
    colours, and values beyond them are clipped to the ends."""

    quantity: str
    centre: float
    half: float

    @property
    def lo(self) -> float:
        return self.centre - self.half

    @property
    def hi(self) -> float:
        return self.centre + self.half

    def position(self, value: float) -> float:
        """The value on the scale: -1 (low end) .. 0 (centre) .. +1 (high end), clipped."""
        if not math.isfinite(value):
            return 0.0
        return min(1.0, max(-1.0, (value - self.centre) / self.half))

    def to_json(self) -> dict:
        return {"quantity": self.quantity, "centre": self.centre, "half": self.half}


def default_scale(quantity: str) -> Scale:
    """The scale without data: the full range of a gate (0..1), of N_t and H_t (-1..1); the
    cell state is unbounded, so -1..1 there too (it is clipped beyond)."""
    return Scale(quantity, CENTRE[quantity], 0.5 if quantity in GATES else 1.0)


def scale_for(quantity: str, values, percentile: float = ROBUST) -> Scale:
    """The robust scale of ``values`` (any shape): centred on the quantity's "nothing" value,
    half-width the ``percentile``-th percentile of ``|value - centre|`` (at most the
    quantity's range: 0.5 for gates, 1 for N_t and H_t)."""
    centre = CENTRE[quantity]
    a = np.asarray(values, dtype=np.float64).ravel()
    a = np.abs(a[np.isfinite(a)] - centre)
    half = float(np.percentile(a, percentile)) if a.size else 0.0
    if quantity != "c":
        half = min(half, default_scale(quantity).half)
    return Scale(quantity, centre, max(half, 1e-6))


def stops(quantity: str) -> tuple[tuple[int, int, int], ...]:
    """The scale's three colours, low to high."""
    return (SHUT, HALF, OPEN) if quantity in GATES else (NEG, MID, POS)


def _mix(a, b, w):
    # rounded half up, as the HTML page's Math.round does
    return tuple(math.floor(x + (y - x) * w + 0.5) for x, y in zip(a, b))


def rgb(quantity: str, value: float, scale: Scale | None = None) -> tuple[int, int, int]:
    """The colour (0-255 RGB) of one value of one quantity on ``scale`` (default:
    :func:`default_scale`)."""
    low, mid, high = stops(quantity)
    x = (scale or default_scale(quantity)).position(value)
    return _mix(mid, high, x) if x >= 0 else _mix(mid, low, -x)


def is_dark(colour: tuple[int, int, int]) -> bool:
    """Whether white text reads better than black on this background."""
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b < 140

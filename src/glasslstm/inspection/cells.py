"""Cell finder: which LSTM cells track a property of the text (a quote, the line length, ...).

Karpathy, Johnson & Fei-Fei (2015, "Visualizing and Understanding Recurrent Networks") found
single cells of character LSTMs that turn on inside quotes and that count the position in a
line. This module looks for such cells the simple way: compute a *probe* signal from the text
(one number per token), then rank every cell of every layer by the Pearson correlation of its
activation over time with that signal.

Probes (:data:`PROBES`, name -> ``fn(text) -> (len(text),) float64``, one value per
character). Every probe gives the state *after reading* the character, the convention of
:class:`~glasslstm.inspection.Analysis` (position t holds the values after reading token t):

- ``quote``: 1 inside "double quotes", else 0; each ``"`` toggles. An opening quote is 1 (we
  are inside after reading it), a closing quote is 0.
- ``line-position``: characters since the last newline: a newline is 0, the first character
  of a line is 1, the second 2, ... (the text starts as if after a newline).
- ``sentence-boundary``: 1 on the character that ends a sentence, else 0. A sentence ends
  with a run of ``. ! ?`` (plus any closing quotes or brackets right after it) that is
  followed by whitespace or the end of the text; the run's last character is the 1. So
  ``said Bob. He`` marks the ``.``, ``"Stop!" he`` marks the closing ``"``, ``3.5`` and
  ``e.g.x`` mark nothing.
- ``bracket-depth``: nesting depth of ``( [ {``; an opening bracket counts its own level,
  a closing one does not; an unmatched closer never takes the depth below 0.
- any other string is a regular expression (Python :mod:`re`): 1 on every character inside
  a (non-empty) match, else 0.

For word and byte models a token spans several characters (or part of one): its value is
the probe's value at its last character, i.e. again the state after reading it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from glasslstm.errors import ConfigError
from glasslstm.inspection.analysis import QUANTITIES, Analysis

__all__ = [
    "PROBES",
    "CellScore",
    "CellReport",
    "Excerpt",
    "probe_function",
    "probe_signal",
    "rank_cells",
    "excerpt",
    "find_cells",
    "plot_cells",
    "display_token",
]

EXCERPT_TOKENS = 200  # long enough to hold a quote or a line or two, short enough to read
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]}]*(?=\s|$)")
_OPEN, _CLOSE = "([{", ")]}"


# --------------------------------------------------------------------------- probes


def quote(text: str) -> np.ndarray:
    """1.0 inside double quotes (the opening ``"`` included), 0.0 outside (the closing one)."""
    out = np.zeros(len(text))
    inside = 0.0
    for t, ch in enumerate(text):
        if ch == '"':
            inside = 1.0 - inside
        out[t] = inside
    return out


def line_position(text: str) -> np.ndarray:
    """Characters since the last newline: ``"ab\\ncd"`` -> 1, 2, 0, 1, 2."""
    out = np.zeros(len(text))
    pos = 0
    for t, ch in enumerate(text):
        pos = 0 if ch == "\n" else pos + 1
        out[t] = pos
    return out


def sentence_boundary(text: str) -> np.ndarray:
    """1.0 on the last character of each sentence ending (see the module docstring)."""
    out = np.zeros(len(text))
    for m in _SENTENCE_END.finditer(text):
        out[m.end() - 1] = 1.0
    return out


def bracket_depth(text: str) -> np.ndarray:
    """Nesting depth of ``( [ {`` after each character: ``"a(b[c])d"`` -> 0 1 1 2 2 1 0 0."""
    out = np.zeros(len(text))
    depth = 0
    for t, ch in enumerate(text):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(depth - 1, 0)
        out[t] = depth
    return out


def regex(pattern: str) -> Callable[[str], np.ndarray]:
    """A probe that is 1.0 on the characters inside matches of ``pattern``.

    Raises :class:`ConfigError` (with :mod:`re`'s message) for an invalid pattern.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"probe {pattern!r} is neither a named probe ({', '.join(PROBES)}) "
            f"nor a valid regular expression: {e}"
        ) from None

    def probe(text: str) -> np.ndarray:
        out = np.zeros(len(text))
        for m in compiled.finditer(text):
            out[m.start() : m.end()] = 1.0
        return out

    probe.__name__ = f"regex({pattern!r})"
    return probe


PROBES: dict[str, Callable[[str], np.ndarray]] = {
    "quote": quote,
    "line-position": line_position,
    "sentence-boundary": sentence_boundary,
    "bracket-depth": bracket_depth,
}

# What a text lacks when a probe is constant over it: (it never ..., choose a text that has ...)
_NEVER = {
    "quote": ('never enters a "double quote"', "double-quoted passages"),
    "line-position": (
        "never changes (the text is a single character or only newlines)",
        "lines of more than one character",
    ),
    "sentence-boundary": (
        "never sees a sentence end (. ! or ? followed by a space, a newline or the end)",
        "several sentences",
    ),
    "bracket-depth": ("never opens a bracket ( [ {", "brackets"),
}


def probe_function(probe: str) -> Callable[[str], np.ndarray]:
    """The per-character probe for a name of :data:`PROBES` or, failing that, a regex."""
    return PROBES[probe] if probe in PROBES else regex(probe)


def probe_signal(analysis: Analysis, probe: str) -> np.ndarray:
    """``(T,)`` float64: the probe over ``analysis``'s text, one value per token.

    A token's value is the probe at its last character (for char models: at the token).
    Raises :class:`ConfigError` when the signal is constant over the text (nothing to
    correlate with), naming what the text lacks.
    """
    fn = probe_function(probe)
    per_char = fn("".join(analysis.tokens))
    ends = np.cumsum([len(t) for t in analysis.tokens]) - 1  # last char of each token
    signal = per_char[np.clip(ends, 0, None)] if len(per_char) else np.zeros(len(ends))
    if len(signal) and np.ptp(signal) == 0:
        never, need = _NEVER.get(
            probe,
            (
                "never changes: the regex matches none of the text (or all of it)",
                f"matches of it and text between them (named probes: {', '.join(PROBES)})",
            ),
        )
        raise ConfigError(
            f"probe {probe!r} is constant over this text ({len(signal):,} tokens): "
            f"it {never}; choose a text that has {need}"
        )
    return signal


# --------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class CellScore:
    """One cell's Pearson correlation ``r`` (in [-1, 1]) with a probe signal."""

    layer: int
    cell: int
    quantity: str  # i f g o c h
    r: float


def _pearson(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Pearson r of each column of ``x`` (T, N) with ``s`` (T,); 0 for a constant column."""
    x = x.astype(np.float64)
    xc = x - x.mean(0)
    sc = s - s.mean()
    nx = np.sqrt((xc * xc).sum(0))
    ns = np.sqrt(sc @ sc)
    # A float32 column that never moves can leave rounding noise after centring: call a column
    # constant when its spread is below float32 resolution of its size, and give it r = 0.
    scale = np.abs(x).max(0) if len(x) else np.zeros(x.shape[1])
    constant = (np.ptp(x, 0) <= 1e-6 * np.maximum(scale, 1.0)) | (nx == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc.T @ sc) / (nx * ns)
    return np.clip(np.where(constant, 0.0, r), -1.0, 1.0)


def rank_cells(
    analysis: Analysis, signal, quantity: str = "c", layers: list[int] | None = None
) -> list[CellScore]:
    """Every cell of ``layers`` (default: all) ranked by ``|r|``, the Pearson correlation of
    its ``quantity`` over the tokens with ``signal`` ``(T,)``; ties keep (layer, cell) order.

    A cell that never changes gets r = 0. Raises :class:`ConfigError` for a constant signal
    and ``ValueError`` for a signal of the wrong length or a bad quantity/layer.
    """
    s = np.asarray(signal, dtype=np.float64)
    if s.shape != (len(analysis),):
        raise ValueError(
            f"signal must have one value per token, shape ({len(analysis)},); got {s.shape}"
        )
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose from {', '.join(QUANTITIES)}")
    if len(s) == 0 or np.ptp(s) == 0:
        raise ConfigError(
            "the probe signal is constant over this text: no cell can correlate "
            "with it; choose a text where the property changes"
        )
    layers = list(range(analysis.num_layers)) if layers is None else list(layers)
    scores = []
    for layer in layers:
        r = _pearson(analysis.values(quantity, layer), s)
        scores += [CellScore(layer, j, quantity, float(v)) for j, v in enumerate(r)]
    return sorted(scores, key=lambda c: -abs(c.r))  # sorted() is stable


# --------------------------------------------------------------------------- excerpts


@dataclass(frozen=True)
class Excerpt:
    """A stretch of tokens ``[start, start + len(tokens))`` with one cell's values on it."""

    layer: int
    cell: int
    quantity: str
    r: float
    start: int
    tokens: list[str]
    values: list[float]  # the cell's quantity at each token
    signal: list[float]  # the probe at each token
    low: float  # the cell's range over the whole text (for shading consistently)
    high: float

    def pairs(self) -> list[tuple[str, float]]:
        """``[(token, value), ...]``: what a view shades."""
        return list(zip(self.tokens, self.values))

    def color_range(self) -> tuple[float, float]:
        """The value range a view maps onto its colours: symmetric about 0 (so 0 is the middle
        colour) for c, h, g and any cell that takes both signs; else the cell's min..max."""
        lim = max(abs(self.low), abs(self.high))
        if (self.quantity in ("c", "h", "g") or self.low < 0 < self.high) and lim > 0:
            return -lim, lim
        return (self.low, self.high) if self.high > self.low else (self.low - 0.5, self.low + 0.5)

    def shade(self) -> np.ndarray:
        """The values scaled to [0, 1] by :meth:`color_range` (over the whole text, so the
        excerpts of one cell are shaded alike)."""
        lo, hi = self.color_range()
        return np.clip((np.asarray(self.values, dtype=np.float64) - lo) / (hi - lo), 0, 1)


def excerpt(analysis: Analysis, score: CellScore, signal, length: int = EXCERPT_TOKENS) -> Excerpt:
    """The ``length``-token window that shows the cell at work best: the one contributing most
    to its correlation (largest sum of ``sign(r) * z(cell) * z(signal)``); for r = 0, the one
    where the cell moves most (largest sum of ``|z(cell)|``)."""
    v = analysis.values(score.quantity, score.layer)[:, score.cell].astype(np.float64)
    s = np.asarray(signal, dtype=np.float64)
    n = min(max(length, 1), len(v))
    zv = (v - v.mean()) / (v.std() or 1.0)
    zs = (s - s.mean()) / (s.std() or 1.0)
    contrib = np.sign(score.r) * zv * zs if score.r else np.abs(zv)
    window = np.convolve(contrib, np.ones(n), mode="valid")  # (T - n + 1,)
    start = int(np.argmax(window))
    sl = slice(start, start + n)
    return Excerpt(
        score.layer,
        score.cell,
        score.quantity,
        score.r,
        start,
        list(analysis.tokens[sl]),
        [float(x) for x in v[sl]],
        [float(x) for x in s[sl]],
        float(v.min()),
        float(v.max()),
    )


@dataclass
class CellReport:
    """The result of :func:`find_cells`: all scores (best first) and excerpts of the best."""

    probe: str
    quantity: str
    signal: np.ndarray  # (T,) the probe per token
    scores: list[CellScore]  # every cell searched, by |r| descending
    excerpts: list[Excerpt]  # of the first few scores

    def to_json(self, top: int = 5) -> dict:
        return {
            "probe": self.probe,
            "quantity": self.quantity,
            "tokens": len(self.signal),
            "cells_searched": len(self.scores),
            "cells": [{**asdict(c), "r": round(c.r, 4)} for c in self.scores[:top]],
            "excerpts": [
                {
                    "layer": e.layer,
                    "cell": e.cell,
                    "r": round(e.r, 4),
                    "start": e.start,
                    "tokens": e.tokens,
                    "values": [round(x, 4) for x in e.values],
                    "signal": [round(x, 4) for x in e.signal],
                }
                for e in self.excerpts
            ],
        }


def find_cells(
    analysis: Analysis,
    probe: str,
    *,
    quantity: str = "c",
    layers: list[int] | None = None,
    excerpts: int = 3,
    excerpt_tokens: int = EXCERPT_TOKENS,
) -> CellReport:
    """Probe the text, rank the cells (:func:`rank_cells`), cut excerpts for the best ones."""
    signal = probe_signal(analysis, probe)
    scores = rank_cells(analysis, signal, quantity, layers)
    return CellReport(
        probe,
        quantity,
        signal,
        scores,
        [excerpt(analysis, c, signal, excerpt_tokens) for c in scores[:excerpts]],
    )


# --------------------------------------------------------------------------- picture


def display_token(token: str) -> str:
    """A token as it is drawn: newline '↵', tab '→', other control characters '·'."""
    return "".join(
        "↵" if c == "\n" else "→" if c == "\t" else c if c.isprintable() else "·" for c in token
    )


def plot_cells(report: CellReport, out_png, *, width: int = 80) -> Path:
    """PNG of the best cell (``report.excerpts[0]``): the excerpt's characters on backgrounds
    coloured by the cell's value, a grey strip under each row for the probe, and below, the
    cell and the probe as curves over the same tokens. Returns the path written."""
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    from glasslstm.viz import _figure, save_figure  # matplotlib (Agg), imported lazily

    plt = _figure()
    ex = report.excerpts[0]
    # Lay the characters out in rows of at most `width`, breaking after each newline.
    chars, row, col = [], 0, 0  # (row, col, char, value, probe)
    for tok, v, s in zip(ex.tokens, ex.values, ex.signal):
        for ch in tok:
            if col >= width:
                row, col = row + 1, 0
            chars.append((row, col, display_token(ch), v, s))
            col += 1
            if ch == "\n":
                row, col = row + 1, 0
    rows = chars[-1][0] + 1 if chars else 1
    norm = Normalize(*ex.color_range())
    cmap, greys = plt.get_cmap("RdBu_r"), plt.get_cmap("Greys")
    s_lo, s_hi = min(ex.signal), max(ex.signal)
    s_span = (s_hi - s_lo) or 1.0

    # Sizes in inches: one character cell is cw x ch, each row has a probe strip below it.
    cw, ch_, strip, gap = 0.1, 0.22, 0.05, 0.07
    row_h = ch_ + strip + gap
    left, right, top, mid, curve_h, bottom = 0.75, 1.0, 0.6, 0.45, 1.5, 0.5
    text_h = rows * row_h
    W = left + width * cw + right
    H = top + text_h + mid + curve_h + bottom
    fig = plt.figure(figsize=(W, H), dpi=110)
    ax = fig.add_axes([left / W, (bottom + curve_h + mid) / H, width * cw / W, text_h / H])
    ax.set_xlim(0, width)
    ax.set_ylim(text_h / row_h * 1.0, 0)  # one unit = one row; y grows downwards
    ax.axis("off")
    u_ch, u_strip = ch_ / row_h, strip / row_h
    for r, c, glyph, v, s in chars:
        ax.add_patch(Rectangle((c, r), 1, u_ch, facecolor=cmap(norm(v)), edgecolor="none"))
        ax.add_patch(
            Rectangle(
                (c, r + u_ch),
                1,
                u_strip,
                edgecolor="none",
                facecolor=greys(0.08 + 0.87 * (s - s_lo) / s_span),
            )
        )
        ax.text(
            c + 0.5,
            r + u_ch / 2,
            glyph,
            ha="center",
            va="center_baseline",
            fontsize=10,
            family="DejaVu Sans Mono",
            color="white" if abs(norm(v) - 0.5) > 0.3 else "black",
        )
    fig.text(
        left / W,
        1 - 0.22 / H,
        f"layer {ex.layer}, cell {ex.cell}: {ex.quantity} against the probe "
        f"{report.probe!r}, r = {ex.r:+.3f}",
        fontsize=12,
        weight="bold",
        va="center",
    )
    fig.text(
        left / W,
        1 - 0.43 / H,
        f"tokens {ex.start}-{ex.start + len(ex.tokens) - 1}; background: the cell's "
        f"{ex.quantity} (blue low, red high); grey strip under each row: the probe "
        f"(dark = {s_hi:g}, light = {s_lo:g})",
        fontsize=9,
        color="dimgrey",
        va="center",
    )
    cax = fig.add_axes(
        [(left + width * cw + 0.2) / W, (bottom + curve_h + mid) / H, 0.12 / W, text_h / H]
    )
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax).set_label(
        f"{ex.quantity} (cell {ex.cell})"
    )

    ax2 = fig.add_axes([left / W, bottom / H, width * cw / W, curve_h / H])
    t = np.arange(ex.start, ex.start + len(ex.tokens))
    ax3 = ax2.twinx()
    ax3.fill_between(t, ex.signal, s_lo, step="mid", color="grey", alpha=0.35, lw=0)
    ax3.set_ylabel(f"probe: {report.probe}", color="dimgrey")
    ax2.set_zorder(ax3.get_zorder() + 1)
    ax2.patch.set_visible(False)  # the cell's curve above the probe's fill
    ax2.plot(t, ex.values, color="tab:red", lw=1.2)
    ax2.set_ylabel(f"{ex.quantity}, cell {ex.cell}", color="tab:red")
    ax2.set_xlim(t[0] - 0.5, t[-1] + 0.5)
    ax2.set_xlabel("token")
    ax2.grid(alpha=0.3)
    return save_figure(fig, out_png)

"""The PNG views of an Analysis (matplotlib), for READMEs and papers.

:func:`plot_png`: the text as coloured boxes for one quantity of one cell, and heatmaps (time x
cells) of every gate of one layer; readable at the default size for up to :data:`MAX_TOKENS`
tokens (a longer text is cut and the title says so). :func:`plot_event`: chosen groups of cells
around an event of the text (their cell state and forget gate, the words along the time axis,
marks at the event) and the model's next-word bars at one token: the article's pictures.

Colours are diverging and centred (:mod:`glasslstm.inspection.common`): 0.5 for the gates, 0
for N_t, C_t and H_t, the ends at a robust percentile, with a colour bar. No torch here.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import numpy as np

from glasslstm.inspection.common import (
    GATES,
    NAMES,
    ROBUST,
    Scale,
    informative_cells,
    is_dark,
    resolve_layer,
    rgb,
    scale_for,
    stops,
)

MAX_TOKENS = 200  # more than this and the boxes get too small to read
MAX_CELLS = 64  # rows of each heatmap: the most informative cells of the layer
LINE_CHARS = 100  # characters per line of the coloured text
FIG_WIDTH = 12.0  # inches, at 100 dpi
HEAT_GRID = (("i", "f"), ("g", "o"), ("c", "h"))


def _cmap(quantity: str):
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list(
        f"glasslstm_{quantity}", [tuple(x / 255 for x in c) for c in stops(quantity)]
    )


def _scale_words(scale: Scale) -> str:
    low, high = ("shut", "open") if scale.quantity in GATES else ("−", "+")
    return (
        f"{scale.lo:.3g} ({low}) → {scale.centre:g} → {scale.hi:.3g} ({high}), "
        f"clipped at the {ROBUST:g}th percentile"
    )


def _colorbar(fig, im, ax, scale: Scale, label: str):
    """A colour bar with the scale's ends and centre as ticks (the ends mean "or beyond")."""
    bar = fig.colorbar(im, ax=ax, fraction=0.035, pad=0.01)
    bar.set_ticks([scale.lo, scale.centre, scale.hi])
    bar.set_ticklabels([f"≤{scale.lo:.2g}", f"{scale.centre:g}", f"≥{scale.hi:.2g}"])
    bar.ax.tick_params(labelsize=7)
    bar.set_label(label, fontsize=8)
    return bar


def _box_text(token: str) -> str:
    """What is written in a token's box: spaces stay blank, a newline is a ↵."""
    return "".join(
        "↵" if ch == "\n" else "→" if ch == "\t" else ch if ch.isprintable() or ch == " " else "·"
        for ch in token
    )


def _layout(tokens: list[str]) -> tuple[list[tuple[int, int, int]], int]:
    """``[(line, column, width)]`` per token in character cells, and the number of lines:
    left to right, wrapping before a word that would cross :data:`LINE_CHARS` (a word: a run of
    tokens without whitespace), a new line after a newline."""
    widths = [max(1, len(_box_text(t))) for t in tokens]
    blank = [t.isspace() for t in tokens]
    out, line, col = [], 0, 0
    for t, width in enumerate(widths):
        if not blank[t] and (t == 0 or blank[t - 1]):  # a word starts: does it fit?
            run = 0
            for u in range(t, len(tokens)):
                if blank[u]:
                    break
                run += widths[u]
            if col and col + run > LINE_CHARS and run <= LINE_CHARS:
                line, col = line + 1, 0
        if col and col + width > LINE_CHARS:
            line, col = line + 1, 0
        out.append((line, col, min(width, LINE_CHARS)))
        col += width
        if "\n" in tokens[t]:
            line, col = line + 1, 0
    return out, (line + 1 if col else line) or 1


def plot_png(
    analysis,
    path,
    *,
    layer: int | None = None,
    cell: int | None = None,
    quantity: str = "c",
    max_tokens: int = MAX_TOKENS,
    max_cells: int = MAX_CELLS,
    title: str | None = None,
) -> dict:
    """Write the figure to ``path`` (PNG, atomically) and return what it shows:
    ``{"path", "layer", "cell", "quantity", "tokens", "of_tokens", "cells", "of_cells"}``.

    ``layer`` defaults to the last, ``cell`` (the one the text is coloured by) to the most
    informative cell of ``layer`` (:func:`informative_cells`). Heatmap rows are the
    ``max_cells`` most informative cells (plus ``cell``), columns the first ``max_tokens``
    tokens; each heatmap has its own robust scale over what it shows.
    """
    from glasslstm.viz import _figure, save_figure

    n_layers, size = analysis.num_layers, analysis.hidden_size
    layer = resolve_layer(analysis, layer, quantity)
    T = min(len(analysis), max_tokens)
    rows = informative_cells(analysis, layer, min(max_cells, size))
    cell = rows[0] if cell is None else cell
    if not 0 <= cell < size:
        raise ValueError(
            f"cell {cell} is out of range: each layer has {size} cells (0..{size - 1})"
        )
    if cell not in rows:
        rows[-1] = cell  # the cell the text is coloured by is always among the rows
    tokens = analysis.tokens[:T]

    plt = _figure()
    places, n_lines = _layout(tokens)
    text_h = 0.32 * n_lines + 0.35
    heat_h = 2.3
    fig = plt.figure(figsize=(FIG_WIDTH, 1.0 + text_h + heat_h * len(HEAT_GRID)), dpi=100)
    grid = fig.add_gridspec(
        1 + len(HEAT_GRID),
        2,
        height_ratios=[text_h] + [heat_h] * len(HEAT_GRID),
        left=0.05,
        right=0.97,
        top=1 - 0.75 / fig.get_figheight(),
        bottom=0.45 / fig.get_figheight(),
        hspace=0.42,
        wspace=0.14,
    )

    # ---- the text, one box per token, coloured by the chosen quantity of the chosen cell
    ax = fig.add_subplot(grid[0, :])
    values = analysis.values(quantity, layer)
    text_scale = (
        scale_for(quantity, values[:T, cell]) if cell < values.shape[1] else Scale(quantity, 0, 1)
    )
    ax_w_in = FIG_WIDTH * (0.97 - 0.05)
    fontsize = min(14.0, 72 * ax_w_in / LINE_CHARS / 0.602 * 0.92)  # DejaVu Sans Mono: 0.602 em
    for tok, (line, col, width) in zip(range(T), places):
        v = float(values[tok, cell]) if cell < values.shape[1] else math.nan
        colour = rgb(quantity, v, text_scale) if math.isfinite(v) else (220, 220, 220)
        ax.add_patch(
            plt.Rectangle(
                (col, line + 0.08), width, 0.84, linewidth=0, facecolor=[x / 255 for x in colour]
            )
        )
        ax.text(
            col + width / 2,
            line + 0.5,
            _box_text(tokens[tok])[:width],
            ha="center",
            va="center",
            family="DejaVu Sans Mono",
            fontsize=fontsize,
            color="white" if is_dark(colour) else "black",
        )
    ax.set_xlim(0, LINE_CHARS)
    ax.set_ylim(n_lines, 0)
    ax.axis("off")
    ax.set_title(
        f"the text coloured by {quantity} ({NAMES[quantity]}) of cell {cell}, "
        f"layer {layer}: {_scale_words(text_scale)}",
        fontsize=10,
        loc="left",
    )

    # ---- heatmaps: rows = cells (most variable first), columns = tokens
    for r, pair in enumerate(HEAT_GRID):
        for c, q in enumerate(pair):
            ax = fig.add_subplot(grid[1 + r, c])
            a = analysis.values(q, layer)[:T].astype(np.float64)
            cols = [k for k in rows if k < a.shape[1]]  # h may be projected (fewer columns)
            img = a[:, cols].T
            sc = scale_for(q, img)
            im = ax.imshow(
                img, aspect="auto", interpolation="nearest", cmap=_cmap(q), vmin=sc.lo, vmax=sc.hi
            )
            if cell in cols:
                k = cols.index(cell)
                ax.add_patch(
                    plt.Rectangle(
                        (-0.5, k - 0.5), T, 1, fill=False, linewidth=1.0, edgecolor="black"
                    )
                )
            ax.set_title(f"{q}: {NAMES[q]}", fontsize=10, loc="left")
            if T <= 60:
                ax.set_xticks(
                    range(T),
                    [_box_text(t).replace(" ", "␣").replace("\n", "↵")[:3] for t in tokens],
                    fontsize=7,
                )
            else:
                ax.tick_params(axis="x", labelsize=8)
            step = max(1, math.ceil(len(cols) / 12))
            ax.set_yticks(range(0, len(cols), step), [str(k) for k in cols[::step]], fontsize=7)
            if c == 0:
                ax.set_ylabel("cell", fontsize=9)
            if r == len(HEAT_GRID) - 1:
                ax.set_xlabel("token (time →)", fontsize=9)
            _colorbar(fig, im, ax, sc, q)

    cut = f"the first {T} of {len(analysis)} tokens" if T < len(analysis) else f"{T} tokens"
    rows_note = (
        f"the {len(rows)} cells of {size} whose h varies most"
        if len(rows) < size
        else f"all {size} cells, h varying most first"
    )
    fig.suptitle(
        title
        or f"glasslstm inspect: layer {layer} of {n_layers}, {cut}; "
        f"heatmaps show {rows_note} (cell {cell} framed)",
        fontsize=12,
        x=0.05,
        ha="left",
    )

    path = save_figure(fig, path)
    return {
        "path": str(path),
        "layer": layer,
        "cell": cell,
        "quantity": quantity,
        "tokens": T,
        "of_tokens": len(analysis),
        "cells": len(rows),
        "of_cells": size,
    }


# --------------------------------------------------------------------------- event pictures


@dataclass(frozen=True)
class CellGroup:
    """Cells that :func:`plot_event` shows together, and why: ``title`` says what they do,
    ``labels`` (one per cell) how strongly (e.g. "cell 12  r = +0.91")."""

    title: str
    cells: tuple[int, ...]
    labels: tuple[str, ...]
    quantities: tuple[str, ...] = ("c", "f")  # a heatmap each, in this order


def _word(token: str) -> str:
    return _box_text(token).replace(" ", "␣").strip() or "␣"


def plot_event(
    analysis,
    path,
    *,
    groups: list[CellGroup],
    title: str,
    subtitle: str = "",
    layer: int = 0,
    columns: list[int] | None = None,
    marks: tuple[tuple[int, str], ...] = (),
    bars_at: int | None = None,
    answer: str | None = None,
    top: int = 8,
) -> dict:
    """Write the article-style picture of an event to ``path`` (PNG, atomically).

    For each group and each of its ``quantities``, a heatmap: rows the group's cells (labelled),
    columns the tokens ``columns`` (default: every token; e.g. the words without the spaces
    between them), each value the quantity after reading that token, on a diverging robust
    scale with its colour bar. ``marks``: ``(token index, label)`` pairs drawn as a line just
    before that token in every heatmap (the full stop, "on the other hand"). ``bars_at``: a token
    whose next-token distribution (its ``top`` guesses, ``answer`` in another colour) is drawn
    beside the heatmaps; its column (or the last shown before it) is framed. Returns what it
    drew: ``{"path", "columns", "cells", "scales", "bars"}``.
    """
    from glasslstm.viz import _figure, save_figure

    layer = resolve_layer(analysis, layer, "c")
    cols = list(range(len(analysis))) if columns is None else list(columns)
    if not cols or not groups:
        raise ValueError("plot_event needs at least one column and one group of cells")
    labels = [_word(analysis.tokens[t]) for t in cols]
    where = {t: k for k, t in enumerate(cols)}

    shown_before = [k for k, t in enumerate(cols) if bars_at is not None and t <= bars_at]
    framed = shown_before[-1] if shown_before else None

    plt = _figure()
    panels = [(g, q) for g in groups for q in g.quantities]
    n_rows = len(panels)
    heights = [0.55 + 0.24 * len(g.cells) for g, _ in panels]
    fig_w = max(10.0, min(20.0, 2.6 + 0.2 * len(cols) + (3.2 if bars_at is not None else 0)))
    fig_h = 1.75 + sum(heights) + 0.75 * n_rows + 0.3
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    right = 0.74 if bars_at is not None else 0.96
    grid = fig.add_gridspec(
        n_rows,
        1,
        height_ratios=heights,
        left=1.55 / fig_w,
        right=right,
        top=1 - 1.55 / fig_h,
        bottom=0.75 / fig_h,
        hspace=0.75 / (sum(heights) / n_rows),
    )
    scales: dict[str, dict] = {}
    axes = []
    for row, (g, q) in enumerate(panels):
        ax = fig.add_subplot(grid[row, 0])
        axes.append(ax)
        img = analysis.values(q, layer)[cols][:, list(g.cells)].astype(np.float64).T
        sc = scale_for(q, img)
        scales[f"{g.title}:{q}"] = sc.to_json()
        im = ax.imshow(
            img, aspect="auto", interpolation="nearest", cmap=_cmap(q), vmin=sc.lo, vmax=sc.hi
        )
        ax.set_yticks(range(len(g.cells)), g.labels, fontsize=8)
        ax.set_xticks(range(len(cols)), labels, fontsize=8, rotation=90)
        ax.set_title(f"{NAMES[q]} of the {g.title}", fontsize=10, loc="left")
        for m, (t, text) in enumerate(marks):
            if t not in where:
                continue
            ax.axvline(where[t] - 0.5, color="black", lw=1.4)
            if row == 0:  # the marks' names, staggered, above the first heatmap
                ax.annotate(
                    text,
                    (where[t] - 0.5, -0.5),
                    xytext=(0, 18 + 13 * (m % 2)),
                    textcoords="offset points",
                    ha="center",
                    fontsize=9,
                    arrowprops={"arrowstyle": "-", "color": "black", "lw": 0.8},
                )
        if framed is not None:
            ax.add_patch(
                plt.Rectangle(
                    (framed - 0.5, -0.5), 1, len(g.cells), fill=False, lw=2.0, edgecolor="black"
                )
            )
        _colorbar(fig, im, ax, sc, q)
    axes[-1].set_xlabel("the text, one column per word (the state after reading it)", fontsize=9)

    drawn_bars = []
    if bars_at is not None:
        bax = fig.add_axes([0.80, 0.75 / fig_h + 0.1, 0.17, 0.6 - 0.75 / fig_h])
        guesses = analysis.top[bars_at][:top]
        words = [_word(w) for w, _ in guesses][::-1]
        probs = [p for _, p in guesses][::-1]
        colours = [
            "#b35806" if answer is not None and _word(w) == answer else "#9e9e9e"
            for w, _ in guesses
        ][::-1]
        bax.barh(range(len(words)), probs, color=colours)
        bax.set_yticks(range(len(words)), words, fontsize=9)
        bax.set_xlim(0, 1)
        bax.set_xlabel("probability", fontsize=9)
        for y, p in enumerate(probs):
            bax.text(min(p + 0.02, 0.8), y, f"{p:.1%}", va="center", fontsize=8)
        before = "".join(analysis.tokens[max(0, bars_at - 6) : bars_at + 1]).strip()
        bax.set_title(f"next word after\n“…{before}”", fontsize=10, loc="left")
        drawn_bars = [[w, round(float(p), 4)] for w, p in guesses]

    fig.suptitle(title, fontsize=13, x=0.01, ha="left", y=1 - 0.2 / fig_h, va="top")
    if subtitle:
        wrapped = textwrap.fill(subtitle, width=int(fig_w * 15))
        fig.text(0.01, 1 - 0.5 / fig_h, wrapped, fontsize=9, color="#333333", va="top")
    path = save_figure(fig, path)
    return {
        "path": str(path),
        "columns": [analysis.tokens[t] for t in cols],
        "cells": {g.title: list(g.cells) for g in groups},
        "scales": scales,
        "bars": drawn_bars,
    }

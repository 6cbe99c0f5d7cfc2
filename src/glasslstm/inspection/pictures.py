"""The PNG view of an Analysis (matplotlib): the text as coloured boxes for one quantity of one
cell, and heatmaps (time x cells) of every gate of one layer, for READMEs and papers.

Readable at the default size for up to :data:`MAX_TOKENS` tokens; a longer text is cut and the
title says so. No torch here.
"""

from __future__ import annotations

import math

import numpy as np

from glasslstm.inspection.common import (
    GATES,
    MID,
    NAMES,
    NEG,
    POS,
    SEQ0,
    SEQ1,
    is_dark,
    resolve_layer,
    rgb,
    top_variance_cells,
)

MAX_TOKENS = 200  # more than this and the boxes get too small to read
MAX_CELLS = 64  # rows of each heatmap: the most variable cells (of c) of the layer
LINE_CHARS = 100  # characters per line of the coloured text
FIG_WIDTH = 12.0  # inches, at 100 dpi
HEAT_GRID = (("i", "f"), ("g", "o"), ("c", "h"))


def _cmap(quantity: str):
    from matplotlib.colors import LinearSegmentedColormap

    stops = [SEQ0, SEQ1] if quantity in GATES else [NEG, MID, POS]
    return LinearSegmentedColormap.from_list(
        f"glasslstm_{quantity}", [tuple(x / 255 for x in c) for c in stops]
    )


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

    ``layer`` defaults to the last, ``cell`` (the one the text is coloured by) to the cell of
    ``layer`` with the largest variance of c over the text. Heatmap rows are the ``max_cells``
    most variable cells of c (plus ``cell``), columns the first ``max_tokens`` tokens.
    """
    from glasslstm.viz import _figure, save_figure

    n_layers, size = analysis.num_layers, analysis.hidden_size
    layer = resolve_layer(analysis, layer, quantity)
    T = min(len(analysis), max_tokens)
    rows = top_variance_cells(analysis.values("c", layer)[:T], min(max_cells, size))
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
    ax_w_in = FIG_WIDTH * (0.97 - 0.05)
    fontsize = min(14.0, 72 * ax_w_in / LINE_CHARS / 0.602 * 0.92)  # DejaVu Sans Mono: 0.602 em
    for tok, (line, col, width) in zip(range(T), places):
        v = float(values[tok, cell]) if cell < values.shape[1] else math.nan
        colour = rgb(quantity, v) if math.isfinite(v) else (220, 220, 220)
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
    scale = (
        "white 0 → green 1"
        if quantity in GATES
        else "tanh(c): blue −1 → white 0 → red +1"
        if quantity == "c"
        else "blue −1 → white 0 → red +1"
    )
    ax.set_title(
        f"the text coloured by {quantity} ({NAMES[quantity]}) of cell {cell}, "
        f"layer {layer} ({scale})",
        fontsize=11,
        loc="left",
    )

    # ---- heatmaps: rows = cells (most variable first), columns = tokens
    for r, pair in enumerate(HEAT_GRID):
        for c, q in enumerate(pair):
            ax = fig.add_subplot(grid[1 + r, c])
            a = analysis.values(q, layer)[:T].astype(np.float64)
            cols = [k for k in rows if k < a.shape[1]]  # h may be projected (fewer columns)
            img = a[:, cols].T
            if q == "c":
                img = np.tanh(img)
            lo = 0.0 if q in GATES else -1.0
            im = ax.imshow(
                img, aspect="auto", interpolation="nearest", cmap=_cmap(q), vmin=lo, vmax=1.0
            )
            if cell in cols:
                k = cols.index(cell)
                ax.add_patch(
                    plt.Rectangle(
                        (-0.5, k - 0.5), T, 1, fill=False, linewidth=1.0, edgecolor="black"
                    )
                )
            ax.set_title(
                f"{q}: {NAMES[q]}{' (as tanh c)' if q == 'c' else ''}", fontsize=10, loc="left"
            )
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
            fig.colorbar(im, ax=ax, fraction=0.035, pad=0.01).ax.tick_params(labelsize=7)

    cut = f"the first {T} of {len(analysis)} tokens" if T < len(analysis) else f"{T} tokens"
    rows_note = (
        f"the {len(rows)} most variable cells of {size}"
        if len(rows) < size
        else f"all {size} cells, most variable first"
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

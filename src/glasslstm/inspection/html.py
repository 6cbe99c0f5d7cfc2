"""The HTML report of an Analysis: one self-contained file (inline CSS and JS, no network).

The page shows the text with each token coloured by a chosen quantity (any gate, c or h) of a
chosen layer and cell, the model's next-token guesses on hover, heatmaps (time x cells) of
every gate of the chosen layer, with their axes (tokens, cell ids) and colour bars, and the gate
saturation table. It opens on the most informative cells (or the ones given: e.g. the cells
that track the subject), and with ``focus`` on one token's guesses already shown. Colours are
diverging and centred (0.5 for gates, 0 for N_t, C_t and H_t), clipped at the 98th percentile of
the distance from the centre over what is shown: the text by the selected cell over the text,
each heatmap over its rows. The arrays travel inside the
page as JSON with base64-packed 8-bit (16-bit for the unbounded cell state) values, so a text
of ~5,000 tokens with 2 x 256 cells stays a file of a few tens of MB at most. No torch here.

Stable hooks for scripts and browser tests: ``select#layer``, ``select#quantity``,
``select#cell``, tokens as ``<span class="tok" data-t="t">`` inside ``#text``, the hover box
``#tooltip``, canvases ``#heat-i`` ... ``#heat-h`` (each with ``data-lo``/``data-centre``/
``data-hi``: its colour scale, and ``data-rows``: its cells), the legend ``#legend`` with
``#legend-lo``/``#legend-hi``, table ``#saturation``; ``body`` carries
``data-layer``/``data-quantity``/``data-cell`` of the current choice and ``data-ready="1"``
once the script has run.
"""

from __future__ import annotations

import base64
import html
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np

from glasslstm.inspection.common import (
    CENTRE,
    EXPLAIN,
    GATES,
    NAMES,
    QUANTITIES,
    ROBUST,
    informative_cells,
    resolve_layer,
    stops,
)
from glasslstm.rundir import atomic_write_text

HEAT_CELLS = 32  # rows of each heatmap: the chosen cells, then the most informative ones
HEAT_TOKENS = 2000  # columns: the first tokens (one pixel or more each)
GLOSSARY_ORDER = ("f", "i", "g", "c", "o", "h")  # the order the article introduces them
HEAT_ORDER = ("c", "f", "i", "g", "o", "h")  # the memory and the gate that keeps it first


def _template() -> str:
    return (resources.files("glasslstm.inspection") / "templates" / "report.html").read_text(
        "utf-8"
    )


def _pack(a: np.ndarray, bounded: bool) -> dict:
    """``(T, n)`` float array -> quantized integers, little-endian, base64 (see the JS ``arr``)."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    bits = 8 if bounded and lo >= -1.0 and hi <= 1.0 else 16
    top = (1 << bits) - 1
    q = np.rint((a - lo) / (hi - lo) * top).astype("<u2" if bits == 16 else "u1")
    return {
        "bits": bits,
        "lo": lo,
        "hi": hi,
        "n": int(a.shape[1]),
        "data": base64.b64encode(q.tobytes()).decode("ascii"),
    }


def _script_json(obj) -> str:
    """JSON that can sit inside <script>: no '</' (ends the element) and no '<!--'."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("</", "<\\/").replace("<!--", "\\u003c!--")


def _shown(token: str) -> str:
    """A token as it appears in the text: newline as a visible ↵ then the line break."""
    out = []
    for ch in token:
        if ch == "\n":
            out.append("↵\n")
        elif ch in "\t ":
            out.append(ch)
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return html.escape("".join(out), quote=False)


def _options(values, labels, selected) -> str:
    return "".join(
        f'<option value="{v}"{" selected" if v == selected else ""}>'
        f"{html.escape(str(label))}</option>"
        for v, label in zip(values, labels)
    )


def _saturation_table(analysis) -> str:
    sat = analysis.saturation()
    n = analysis.num_layers
    head = (
        '<tr><th class="name" rowspan="2">gate</th>'
        + "".join(f'<th colspan="2">layer {k}</th>' for k in range(n))
        + "</tr><tr>"
        + "<th>left (&lt; 0.1)</th><th>right (&gt; 0.9)</th>" * n
        + "</tr>"
    )
    rows = []
    for q in ("f", "i", "o"):
        cells = "".join(
            f'<td data-gate="{q}" data-layer="{r["layer"]}" data-side="left">'
            f'{r["left"]:.1%}</td><td data-gate="{q}" data-layer="{r["layer"]}" '
            f'data-side="right">{r["right"]:.1%}</td>'
            for r in sat[q]
        )
        rows.append(f'<tr><td class="name">{html.escape(NAMES[q])}</td>{cells}</tr>')
    return f'<table class="sat" id="saturation">{head}{"".join(rows)}</table>'


def render_html(
    analysis,
    *,
    layer: int | None = None,
    cell: int | None = None,
    cells: list[int] | None = None,
    quantity: str = "c",
    title: str | None = None,
    focus: int | None = None,
    notes: str | None = None,
) -> str:
    """The report as one HTML string. ``layer`` defaults to the last. ``cells``: the cells of
    ``layer`` to show first (top rows of the heatmaps, first in the cell list; default: none,
    the most informative ones, :func:`informative_cells`, come first); ``cell``, the one the
    text is coloured by at first, defaults to the first of them. ``quantity`` (i f g o c h) is
    the one the text is coloured by at first; all three can be changed on the page. ``focus``:
    a token whose next-token guesses the page opens with. ``notes``: a paragraph shown under
    the title (what the chosen cells are)."""
    n_layers, size = analysis.num_layers, analysis.hidden_size
    layer = resolve_layer(analysis, layer, quantity)
    chosen = list(dict.fromkeys(int(k) for k in cells or ()))
    for k in chosen + ([] if cell is None else [cell]):
        if not 0 <= k < size:
            raise ValueError(
                f"cell {k} is out of range: each layer has {size} cells (0..{size - 1})"
            )
    order = [informative_cells(analysis, k, size) for k in range(n_layers)]
    order[layer] = chosen + [k for k in order[layer] if k not in chosen]
    cell = order[layer][0] if cell is None else cell
    if focus is not None and not 0 <= focus < len(analysis):
        raise ValueError(f"focus {focus} is out of range: the text has {len(analysis)} tokens")
    T = len(analysis)
    title = title or "glasslstm inspect"

    data = {
        "T": T,
        "num_layers": n_layers,
        "hidden_size": size,
        "level": analysis.level,
        "tokens": analysis.tokens,
        "top": [[[s, round(float(p), 4)] for s, p in row] for row in analysis.top],
        "target": [
            None if not np.isfinite(p) else round(float(p), 4) for p in analysis.target_prob
        ],
        "arrays": {q: [_pack(a, bounded=q != "c") for a in analysis.gates[q]] for q in QUANTITIES},
        "order": order,
        "chosen": {"layer": layer, "cells": chosen},
        "default": {"layer": layer, "quantity": quantity, "cell": cell, "t": focus},
        "heat": {"cells": min(HEAT_CELLS, size), "tokens": HEAT_TOKENS},
        "scale": {
            "robust": ROBUST,
            "centre": CENTRE,
            "stops": {q: stops(q) for q in QUANTITIES},
        },
        "names": NAMES,
        "explain": EXPLAIN,
    }
    tokens = "".join(
        f'<span class="tok" data-t="{t}">{_shown(tok)}</span>'
        for t, tok in enumerate(analysis.tokens)
    )
    glossary = (
        '<dl class="glossary" id="glossary">'
        + "".join(
            f'<dt data-q="{q}">{q}: {html.escape(NAMES[q])}</dt><dd>{html.escape(EXPLAIN[q])}'
            f"{' (a gate: 0 shut, 1 open)' if q in GATES else ''}</dd>"
            for q in GLOSSARY_ORDER
        )
        + "</dl>"
    )
    heatmaps = "".join(
        f'<div class="heat" data-q="{q}"><figure><figcaption><b>{q}: {html.escape(NAMES[q])}</b>'
        f' — {html.escape(EXPLAIN[q])}</figcaption><div class="scroll">'
        f'<canvas id="heat-{q}" width="1" height="1"></canvas></div></figure></div>'
        for q in HEAT_ORDER
    )
    meta = (
        f"{T:,} {analysis.level}-level tokens · {n_layers} layer{'s' if n_layers > 1 else ''}"
        f" of {size} cells"
    )
    rank = {k: r for r, k in enumerate(order[layer])}
    if analysis.truncated:
        meta += f" · the text was cut to its first {T:,} tokens"
    parts = {
        "title": html.escape(title),
        "meta": html.escape(meta),
        "layer_select": '<select id="layer">'
        + _options(
            range(n_layers),
            [
                f"{k}{' (first)' if k == 0 else ''}"
                f"{' (last)' if k == n_layers - 1 and n_layers > 1 else ''}"
                for k in range(n_layers)
            ],
            layer,
        )
        + "</select>",
        "quantity_select": '<select id="quantity">'
        + _options(QUANTITIES, [f"{q} — {NAMES[q]}" for q in QUANTITIES], quantity)
        + "</select>",
        "cell_select": '<select id="cell">'
        + _options(order[layer], [_cell_label(k, rank[k], chosen) for k in order[layer]], cell)
        + "</select>",
        "notes": html.escape(notes or ""),
        "tokens": tokens,
        "glossary": glossary,
        "heatmaps": heatmaps,
        "saturation": _saturation_table(analysis),
        "length": f"{len(analysis.text):,} characters",
        "plain": html.escape(analysis.text, quote=False),
        "data": _script_json(data),
    }
    # One pass over the template: text put in is never scanned for placeholders again.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], _template())


def _cell_label(k: int, rank: int, chosen: list[int]) -> str:
    """How a cell is listed (the page's script writes the same)."""
    return f"{k}  (chosen)" if k in chosen else f"{k}  (#{rank + 1 - len(chosen)} by change of h)"


def write_html(analysis, path, **kwargs) -> Path:
    """Write :func:`render_html` to ``path`` (atomically: a temporary file, then a rename)."""
    path = Path(path)
    atomic_write_text(path, render_html(analysis, **kwargs))  # a failure: one WriteError line
    return path

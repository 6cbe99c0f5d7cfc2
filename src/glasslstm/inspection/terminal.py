"""The terminal view of an Analysis: one row per token, the gates and states of chosen cells,
and the model's next-token guesses. ANSI colour only when asked (the command asks when stdout
is a terminal). No torch here.
"""

from __future__ import annotations

import math

from glasslstm.inspection.common import (
    NAMES,
    QUANTITIES,
    ROBUST,
    informative_cells,
    is_dark,
    printable,
    rgb,
    scale_for,
)

DEFAULT_CELLS = 3
ORDER = ("f", "i", "g", "o", "c", "h")  # the article's reading order: keep, write, what, show
MAX_TOKEN_WIDTH = 12
VALUE_W = 6
RESET = "\x1b[0m"
BOLD = "\x1b[1m"
DIM = "\x1b[2m"


def resolve(analysis, layer: int | None = None, cells=None) -> tuple[int, list[int], bool]:
    """``(layer, cells, chosen_by_default)``: layer defaults to the last, cells to the
    :data:`DEFAULT_CELLS` most informative ones (:func:`informative_cells`). Raises
    ``ValueError`` naming the valid range for a bad index."""
    n_layers, size = analysis.num_layers, analysis.hidden_size
    if layer is None:
        layer = n_layers - 1
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"layer {layer} is out of range: the model has {n_layers} "
            f"layer{'s' if n_layers > 1 else ''} (0..{n_layers - 1})"
        )
    if cells is None or len(cells) == 0:
        n = min(DEFAULT_CELLS, size)
        return layer, informative_cells(analysis, layer, n), True
    bad = [k for k in cells if not 0 <= k < size]
    if bad:
        raise ValueError(
            f"cell {bad[0]} is out of range: each layer has {size} cells (0..{size - 1})"
        )
    return layer, list(dict.fromkeys(int(k) for k in cells)), False


def _ansi256(colour: tuple[int, int, int]) -> int:
    """The nearest colour of the 256-colour palette (6x6x6 cube or grey ramp)."""
    levels = (0, 95, 135, 175, 215, 255)
    idx = [min(range(6), key=lambda j: abs(levels[j] - c)) for c in colour]
    cube = tuple(levels[j] for j in idx)
    grey_j = min(23, max(0, round((sum(colour) / 3 - 8) / 10)))
    grey = (8 + 10 * grey_j,) * 3

    def dist(a):
        return sum((x - y) ** 2 for x, y in zip(a, colour))

    return 232 + grey_j if dist(grey) < dist(cube) else 16 + 36 * idx[0] + 6 * idx[1] + idx[2]


def _paint(text: str, colour: tuple[int, int, int]) -> str:
    fg = 231 if is_dark(colour) else 16
    return f"\x1b[48;5;{_ansi256(colour)}m\x1b[38;5;{fg}m{text}{RESET}"


def _short(token: str, width: int = MAX_TOKEN_WIDTH) -> str:
    s = printable(token)
    return s if len(s) <= width else s[: width - 1] + "…"


def _num(v: float) -> str:
    """Six columns: two decimals, fewer for the large cell states of long texts."""
    if not math.isfinite(v):
        return f"{'nan':>{VALUE_W}}"
    return f"{v:{VALUE_W}.2f}" if abs(v) < 999.5 else f"{v:{VALUE_W}.0f}"


def render(
    analysis, *, layer: int | None = None, cells=None, color: bool = False, top_k: int | None = None
) -> str:
    """The table as one string (lines joined by '\\n', no trailing newline).

    One row per token: the token (space as '␣', newline as '\\n'), f i g o c h of each chosen
    cell of ``layer`` after reading it, the ``top_k`` most likely next tokens with their
    probabilities (default: all that the Analysis holds), and the probability given to the token
    that actually came next. ``color=True`` adds ANSI colours (the value as background colour, on
    a diverging scale per cell and quantity: gates purple (shut) -> white (0.5) -> orange (open),
    g, c, h blue (-) -> white (0) -> red (+), clipped at the 98th percentile of the distance).
    """
    layer, cells, by_default = resolve(analysis, layer, cells)
    n_layers = analysis.num_layers
    why = (
        f"the {len(cells)} whose h varies most over this text (choose with --cells)"
        if by_default
        else "as asked"
    )
    lines = [
        f"layer {layer} (layers 0..{n_layers - 1}), cells {', '.join(map(str, cells))}: {why}",
        "  " + " · ".join(f"{q}: {NAMES[q]}" for q in ORDER),
    ]
    if color:
        lines.append(
            "  colours, per cell: gates f, i, o purple (shut) -> white (0.5) -> orange (open); "
            f"g, c, h blue (-) -> white (0) -> red (+); the ends at the {ROBUST:g}th "
            "percentile of the distance from the middle"
        )
    if analysis.truncated:
        lines.append(f"  (the text was cut to its first {len(analysis)} tokens)")

    values = {q: analysis.values(q, layer) for q in QUANTITIES}
    h_size = values["h"].shape[1]  # smaller than c's with a projection
    scales = {
        (q, k): scale_for(q, values[q][:, k])
        for q in QUANTITIES
        for k in cells
        if k < values[q].shape[1]
    }
    tok_w = max(5, min(MAX_TOKEN_WIDTH, max(len(printable(t)) for t in analysis.tokens)))
    t_w = len(str(len(analysis) - 1))
    block = " ".join(f"{q:>{VALUE_W}}" for q in ORDER)  # one cell: 6 values + gaps
    block_w = len(block)
    head1 = " " * (t_w + 2 + tok_w) + "".join(f" │ {('cell ' + str(k)):^{block_w}}" for k in cells)
    head2 = f"{'t':>{t_w}}  {'token':<{tok_w}}" + "".join(f" │ {block}" for _ in cells)
    k = len(analysis.top[0]) if top_k is None else min(top_k, len(analysis.top[0]))
    guess_w = max((len(_short(s, 8)) for row in analysis.top for s, _ in row[:k]), default=1)
    guesses_w = k * (guess_w + 5) + 2 * (k - 1)
    head2 += f" │ {'next: top-' + str(k):<{guesses_w}}   p(actual next)"
    lines += [DIM + head1 + RESET if color else head1, BOLD + head2 + RESET if color else head2]

    for t, token in enumerate(analysis.tokens):
        row = f"{t:>{t_w}}  "
        tok = _short(token, tok_w)
        row += (BOLD + tok + RESET + " " * (tok_w - len(tok))) if color else f"{tok:<{tok_w}}"
        for cell in cells:
            parts = []
            for q in ORDER:
                if q == "h" and cell >= h_size:
                    parts.append(f"{'-':>{VALUE_W}}")
                    continue
                v = float(values[q][t, cell])
                parts.append(_paint(_num(v), rgb(q, v, scales[q, cell])) if color else _num(v))
            row += " │ " + " ".join(parts)
        guesses = "  ".join(f"{_short(s, 8):<{guess_w}} {p:4.0%}" for s, p in analysis.top[t][:k])
        p_next = analysis.target_prob[t]
        nxt = f"{'-':>14}" if not math.isfinite(p_next) else f"{p_next:14.1%}"
        row += f" │ {guesses}   {nxt}"
        lines.append(row)
    return "\n".join(lines)

"""The web inspector's arithmetic on gate values, in NumPy: which cells are worth showing, how to
colour them, which cells stay on across a span, and where else a pattern of cells is on.

Everything takes plain arrays ``(T, H)`` (steps x cells of one quantity in one layer); nothing
here knows about HTTP or torch.

- :func:`informative_cells`: cells ranked by what they remember: the bits their hidden state
  tells about the next token beyond what the current token tells (conditional mutual
  information, over a text).
- :func:`colour_scale`: a diverging scale centred on 0 (c, g, h) or 0.5 (the gates i, f, o),
  its half-width set by robust percentiles so that a few extreme values do not wash the rest
  out (values beyond are clipped to the end colours).
- :func:`cells_on`, :func:`pattern_cells`, :func:`find_matches`: LSTMVis's span matching
  (Strobelt et al. 2017): the cells above a threshold across a selected span, the few of them
  that are on least often elsewhere, and the spans of another text where (all but a tolerance
  of) those cells are on together.
"""

from __future__ import annotations

import numpy as np

from glasslstm.inspection.common import GATES

CENTRE = {q: (0.5 if q in GATES else 0.0) for q in ("i", "f", "g", "o", "c", "h")}
BOUNDED = {"i": 0.5, "f": 0.5, "o": 0.5, "g": 1.0, "h": 1.0}  # the largest possible half-width
PERCENTILES = (1.0, 99.0)  # the colour scale's robust range: 1% of values may clip each side
MI_BINS = 4  # a cell's hidden state in quartiles: enough to tell on / off / in between
MI_TOKENS = 63  # tokens counted apart; rarer ones share one "other" bin (word models)


def _top_tokens(ids: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """``ids`` renumbered 0..k-1 by frequency, the rarest beyond ``n`` sharing the id ``n``."""
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    keep = np.argsort(-counts, kind="stable")[:n]
    remap = np.full(len(uniq), len(keep), dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    return remap[inverse], len(keep) + 1


def informative_cells(h: np.ndarray, token_ids, top: int | None = None) -> list[dict]:
    """Cells of ``h`` ``(T, H)`` ranked by what they remember: the conditional mutual
    information ``I(cell after token t; token t+1 | token t)`` in bits, most first, as
    ``{"cell", "bits"}``; ``top`` cuts the list.

    What a cell says about the next token *beyond what the current token says*: a cell that
    merely echoes the character just read scores little, one that carries the subject's gender
    or "inside a quote" from far back scores high (those are the cells whose rows show events).
    The cell's value is cut into :data:`MI_BINS` quantile bins; tokens beyond the
    :data:`MI_TOKENS` most frequent share a bin. Plug-in estimate from the counts over the
    text; its bias depends on the counts of tokens, the same for every cell, so the order is
    what it measures. A cell that never moves carries 0 bits. Needs at least 2 tokens.
    """
    h = np.asarray(h, dtype=np.float64)
    ids = np.asarray(token_ids, dtype=np.int64)
    if h.ndim != 2 or len(ids) != len(h) or len(h) < 2:
        raise ValueError(f"need (T, H) values and T >= 2 token ids; got {h.shape}, {len(ids)}")
    x = h[:-1]
    cur, n_s = _top_tokens(ids[:-1], MI_TOKENS)
    nxt, n_y = _top_tokens(ids[1:], MI_TOKENS)
    T, H = x.shape
    # quantile bins per cell; ties stay together, so a constant cell falls into one bin
    edges = np.quantile(x, np.linspace(0, 1, MI_BINS + 1)[1:-1], axis=0)  # (B - 1, H)
    bins = (x[None] > edges[:, None, :]).sum(0)  # (T, H) in 0..B-1
    sy = cur * n_y + nxt  # (T,) the (current, next) pair
    p_s = np.bincount(cur, minlength=n_s) / T  # (S,)
    bits = np.zeros(H)
    block = max(1, 2_000_000 // (n_s * MI_BINS * n_y))  # cells at a time: bounded memory
    for a in range(0, H, block):
        k = min(block, H - a)
        flat = (np.arange(k)[None, :] * MI_BINS + bins[:, a : a + k]) * (n_s * n_y) + sy[:, None]
        p = np.bincount(flat.ravel(), minlength=k * MI_BINS * n_s * n_y) / T
        p = p.reshape(k, MI_BINS, n_s, n_y)
        p_sb = p.sum(3, keepdims=True)  # (k, B, S, 1)
        p_sy = p.sum(1, keepdims=True)  # (k, 1, S, Y)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = p * p_s[None, None, :, None] / (p_sb * p_sy)
            terms = np.where(p > 0, p * np.log2(ratio), 0.0)
        bits[a : a + k] = terms.sum((1, 2, 3))
    bits = np.maximum(bits, 0.0)
    order = np.lexsort((np.arange(H), -bits))[: top if top is not None else H]
    return [{"cell": int(k), "bits": round(float(bits[k]), 4)} for k in order]


def colour_scale(values: np.ndarray, quantity: str) -> dict:
    """The diverging colour scale for ``values`` of ``quantity``: ``centre`` (0, or 0.5 for the
    gates), ``half`` (the half-width: the farther of the 1st and 99th percentiles from the
    centre, never past what the quantity can reach), ``min``/``max`` = centre -/+ half, and
    ``clipped``: the fraction of values beyond that range (drawn in the end colours)."""
    centre = CENTRE[quantity]
    v = np.asarray(values, dtype=np.float32).ravel()
    v = v[np.isfinite(v)]
    if v.size:
        lo, hi = np.percentile(v, PERCENTILES)
        half = max(abs(float(hi) - centre), abs(float(lo) - centre))
    else:
        half = 0.0
    half = min(half, BOUNDED.get(quantity, np.inf))
    half = half if half > 1e-6 else (BOUNDED.get(quantity, 1.0))  # all at the centre: full range
    clipped = float((np.abs(v.astype(np.float64) - centre) > half).mean()) if v.size else 0.0
    return {
        "centre": centre,
        "half": round(half, 6),
        "min": round(centre - half, 6),
        "max": round(centre + half, 6),
        "percentiles": list(PERCENTILES),
        "clipped": round(clipped, 6),
    }


def cells_on(values: np.ndarray, start: int, end: int, threshold: float) -> list[dict]:
    """Cells of ``values`` ``(T, H)`` above ``threshold`` at every step of ``[start, end)``,
    strongest (highest minimum) first, as ``{"cell", "min", "mean"}``."""
    span = values[start:end]  # (L, H)
    on = np.flatnonzero((span > threshold).all(0))
    lo, mean = span.min(0), span.mean(0)
    on = on[np.argsort(-lo[on], kind="stable")]
    return [
        {"cell": int(c), "min": round(float(lo[c]), 4), "mean": round(float(mean[c]), 4)}
        for c in on
    ]


def pattern_cells(values: np.ndarray, cells: list[int], threshold: float, n: int) -> list[dict]:
    """The ``n`` of ``cells`` that are on (above ``threshold``) least often in ``values``
    ``(T, H)``: the ones that single the span out. ``{"cell", "on_fraction"}``, rarest first
    (ties keep the order of ``cells``). A cell that is on almost everywhere says little about a
    span; LSTMVis users pick such distinctive cells by eye."""
    if not cells:
        return []
    frac = (values[:, cells] > threshold).mean(0)
    order = np.argsort(frac, kind="stable")[:n]
    return [{"cell": int(cells[j]), "on_fraction": round(float(frac[j]), 4)} for j in order]


def find_matches(
    values: np.ndarray,
    cells: list[int],
    threshold: float,
    length: int,
    top: int = 10,
    tolerance: int = 0,
) -> list[dict]:
    """Maximal spans of ``values`` ``(T, H)`` where at least ``len(cells) - tolerance`` of
    ``cells`` (and at least one) are above ``threshold`` at every step, best first.

    Score (in (0, 1]) = length similarity ``min(L, length) / max(L, length)`` times coverage
    (the mean fraction of ``cells`` on over the span's steps): a span of the query's length in
    which all the cells are on throughout scores 1. Each match: ``start``, ``end`` (token
    indices), ``score``, ``coverage``.
    """
    need = max(1, len(cells) - max(0, tolerance))
    counts = (values[:, cells] > threshold).sum(1)  # (T,)
    hit = counts >= need
    edges = np.diff(np.concatenate([[0], hit.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lens = ends - starts
    sim = np.minimum(lens, length) / np.maximum(lens, length)
    csum = np.concatenate([[0], np.cumsum(counts)])
    best: list[dict] = []
    # coverage <= 1, so a span's score is at most its length similarity: visit spans in that
    # order and stop once no later one can enter the top list.
    for j in np.argsort(-sim, kind="stable"):
        if len(best) >= top and sim[j] <= best[-1]["score"]:
            break
        a, b = int(starts[j]), int(ends[j])
        coverage = float(csum[b] - csum[a]) / ((b - a) * len(cells))
        best.append(
            {
                "start": a,
                "end": b,
                "score": round(float(sim[j]) * coverage, 4),
                "coverage": round(coverage, 4),
            }
        )
        best.sort(key=lambda m: (-m["score"], m["start"]))
        del best[top:]
    return best

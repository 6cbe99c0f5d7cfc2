"""Pictures for people: learning curves (matplotlib, written as PNG; no window needed)."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

from glasslstm.rundir import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` (PNG) atomically — a temp file, then a rename — and close it."""
    plt = _figure()
    path = Path(path)
    png = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # rare scripts
            fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, png.getvalue())  # a failure: one WriteError line, the old file kept
    return path


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash (or any line that is not
    a JSON object) is skipped."""
    records: list[dict] = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):  # anything else is not a row glasslstm wrote
            records.append(record)
    return records


def _plottable(step, bpc) -> bool:
    numbers = (int, float)
    return (
        isinstance(step, numbers)
        and isinstance(bpc, numbers)
        and not isinstance(bpc, bool)
        and math.isfinite(bpc)
    )


def plot_curves(metrics_path, out_png) -> Path | None:
    """Train and validation bits per character against step, as a PNG. None if no data."""
    records = read_metrics(metrics_path)
    series = {
        split: [
            (r["step"], r["bpc"])
            for r in records
            if r.get("split") == split and _plottable(r.get("step"), r.get("bpc"))
        ]
        for split in ("train", "val")
    }
    if not any(series.values()):
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for split, style in (("train", "-"), ("val", "o-")):
        if series[split]:
            steps, bpc = zip(*series[split])
            ax.plot(steps, bpc, style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title("glasslstm: learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out_png)

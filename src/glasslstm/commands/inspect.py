"""glasslstm inspect: every gate of every token of a text — a terminal table, JSON, an HTML
report and PNG pictures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from glasslstm import options
from glasslstm.commands import common
from glasslstm.commands.common import unknown_note
from glasslstm.config import QUANTITIES
from glasslstm.errors import ConfigError, DataError

OPTIONS = {  # --layer and --cells: against the model, once it is loaded
    "top_k": options.integer(1),
    "html": options.OUTFILE,
    "png": options.OUTFILE,
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show the gates, states and guesses of a model at every token of a text",
        description="Run a trained model over a text and show, per token, the forget gate f, input "
        "gate i, new information g (N_t), output gate o, cell state c and hidden state h of chosen "
        "cells, with the model's most likely next tokens. Prints a table (coloured on a terminal), "
        "or JSON; --html writes a self-contained interactive report, --png a picture.",
    )
    common.add_run_dir(p)
    p.add_argument("--text", help="the text to look at")
    p.add_argument(
        "--file", help="read the text from this file (UTF-8; any bytes for a byte model)"
    )
    p.add_argument(
        "--layer", type=int, default=None, help="which layer (0 = the first; default: the last)"
    )
    p.add_argument(
        "--cells",
        default=None,
        metavar="K,K,...",
        help="cells to show, e.g. 3,17 (default: for a model `glasslstm train` trained on the "
        "stories, the cells it found tracking the subject and the hero; else the 3 whose hidden "
        "state varies most over the text; in --html/--png the first one colours the text)",
    )
    p.add_argument(
        "--quantity",
        choices=QUANTITIES,
        default="c",
        help="what colours the text in --html/--png (default: c, the cell state)",
    )
    p.add_argument("--top-k", type=int, default=3, help="next-token guesses per token (default: 3)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: the text, tokens, next-token guesses and the gates and "
        "states of the shown layer and cells (--layer, --cells)",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="with --json: every layer's and cell's values (for a long text, hundreds of MB)",
    )
    p.add_argument("--html", metavar="OUT", help="write a self-contained HTML report to OUT")
    p.add_argument("--png", metavar="OUT", help="write heatmaps and the coloured text to OUT (PNG)")
    common.add_which(p)
    p.set_defaults(run=run)


def _parse_cells(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        cells = [int(part) for part in spec.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(
            f"--cells must be cell numbers separated by commas, e.g. 3,17; got {spec!r}"
        ) from None
    if not cells:
        raise ConfigError(f"--cells names no cell; give e.g. 3,17 (got {spec!r})")
    return cells


def _read_text(args, level: str) -> tuple[str, str]:
    """``(text, where)`` from --text or --file, with one clear error for each way it can fail."""
    if (args.text is None) == (args.file is None):
        raise ConfigError("give exactly one of --text TEXT or --file FILE")
    if args.text is not None:
        text, where = args.text, "--text"
    else:
        path = Path(args.file)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        where = str(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            if level != "byte":
                bad = data[e.start : e.start + 4].hex(" ")
                raise DataError(
                    f"{path} is not valid UTF-8: at byte offset {e.start} ({e.reason}; "
                    f"bytes {bad}). Re-encode it as UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8)"
                ) from None
            # A byte model reads any file; the bytes that are not UTF-8 reach it as U+FFFD.
            text = data.decode("utf-8", errors="replace")
            print(
                f"glasslstm inspect: note: {path} is not all valid UTF-8 (first bad byte at "
                f"offset {e.start}); those bytes are read as U+FFFD",
                file=sys.stderr,
            )
    if not text:
        raise DataError(f"{where} is empty; give at least one token to look at")
    return text, where


def _check_range(layer: int | None, cells: list[int] | None, n_layers: int, size: int) -> None:
    if layer is not None and not 0 <= layer < n_layers:
        raise ConfigError(
            f"--layer {layer} is out of range: the model has {n_layers} "
            f"layer{'s' if n_layers > 1 else ''} (0..{n_layers - 1})"
        )
    for k in cells or ():
        if not 0 <= k < size:
            raise ConfigError(
                f"--cells: cell {k} is out of range: each layer has {size} cells (0..{size - 1})"
            )


def run(args) -> int:
    from glasslstm.inspection import analyze
    from glasslstm.inspection.terminal import render, resolve
    from glasslstm.model import LanguageModel

    options.check_args(args, OPTIONS)
    cells = _parse_cells(args.cells)
    model = LanguageModel.load(args.run_dir, which=args.which)
    chosen = None
    if cells is None:  # a stories run's subject and hero cells, if the layer is theirs
        from glasslstm.inspection.article import load_cells

        found = load_cells(args.run_dir)
        layer = model.config.num_layers - 1 if args.layer is None else args.layer
        chosen = found[1] if found and found[0] == layer else None
    _check_range(args.layer, cells, model.config.num_layers, model.config.hidden_size)
    tok = model.require_tokenizer()
    text, where = _read_text(args, tok.level)
    unknown = tok.unknown(text)
    if unknown:
        print(unknown_note(tok, unknown, where), file=sys.stderr)
    analysis = analyze(model, text, top_k=args.top_k)
    analysis.meta.update(
        {"run_dir": str(args.run_dir), "which": args.which, "source": where, "unknown": unknown}
    )
    layer, cells, by_default = resolve(analysis, args.layer, cells or chosen)
    if chosen and cells == chosen:
        by_default = False

    written = []
    if args.html:
        from glasslstm.inspection.html import write_html

        path = write_html(
            analysis,
            args.html,
            layer=layer,
            cells=cells,
            quantity=args.quantity,
            notes="The cells glasslstm train found tracking whom the text is about, then the "
            "hero (RUN/article/cells.json)."
            if chosen
            else None,
            title=f"glasslstm inspect: {Path(args.run_dir).name} on "
            f"{'the given text' if args.file is None else Path(where).name}",
        )
        n = path.stat().st_size
        size = f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
        written.append(
            f"{path} ({size}, {len(analysis):,} tokens, "
            f"{analysis.num_layers} layers x {analysis.hidden_size} cells)"
        )
    if args.png:
        from glasslstm.inspection.pictures import plot_png

        shown = plot_png(analysis, args.png, layer=layer, cell=cells[0], quantity=args.quantity)
        cut = (
            f"first {shown['tokens']} of {shown['of_tokens']} tokens"
            if shown["tokens"] < shown["of_tokens"]
            else f"{shown['tokens']} tokens"
        )
        written.append(
            f"{shown['path']} (layer {layer}, {args.quantity} of cell {shown['cell']}, {cut})"
        )

    if args.json:
        out = analysis.to_json() if args.all else analysis.to_json(layer, cells)
        out["selection"] = {"layer": layer, "cells": cells, "by_variance": by_default}
        print(json.dumps(out))
    elif not written:
        print(render(analysis, layer=layer, cells=cells, color=sys.stdout.isatty()))
    if written:
        print("wrote " + " and ".join(written), file=sys.stderr if args.json else sys.stdout)
    return 0

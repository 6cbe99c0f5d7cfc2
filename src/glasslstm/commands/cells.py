"""glasslstm cells: find the cells that track a property of the text (quotes, line length, ...).

Runs the model over a text once, computes a probe signal from the text, ranks every cell by
the Pearson correlation of its activation with the probe, and shows the best cells on an
excerpt, each character shaded by the cell's value (Karpathy, Johnson & Fei-Fei 2015).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from glasslstm import options
from glasslstm.commands import common
from glasslstm.commands.common import unknown_note
from glasslstm.config import PROBES, QUANTITIES
from glasslstm.errors import ConfigError, DataError

BLOCKS = "▁▂▃▄▅▆▇█"
SHOWN = 3  # excerpts printed (and cut) for the best cells
WIDTH = 72  # characters per printed excerpt row

OPTIONS = {  # --layer: against the model, once it is loaded
    "top": options.integer(1),
    "max_chars": options.integer(1),
    "png": options.OUTFILE,
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "cells",
        help="find the cells that track quotes, line position, brackets, a regex",
        description="Rank every cell by the Pearson correlation of its activation with a probe "
        "signal computed from the text, and show the best cells on an excerpt. Probes: quote "
        "(1 inside double quotes), line-position (characters since the last newline), "
        "sentence-boundary (1 on the character ending a sentence), bracket-depth (nesting of "
        "( [ {), or any other string as a regular expression (1 on matched characters).",
    )
    common.add_run_dir(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="a UTF-8 text file, or a named corpus (stories, shakespeare: its validation split)",
    )
    p.add_argument("--data-dir", default=None, help="where named corpora are looked up")
    p.add_argument(
        "--probe",
        default="quote",
        metavar="NAME|REGEX",
        help=f"{' | '.join(PROBES)} | a regex (default: quote)",
    )
    p.add_argument(
        "--quantity",
        choices=QUANTITIES,
        default="c",
        help="which value of each cell: the cell state c (default), the hidden "
        "state h, or a gate i f g o",
    )
    p.add_argument("--layer", type=int, default=None, help="search one layer (default: all)")
    p.add_argument("--top", type=int, default=5, help="cells to list (default: 5)")
    p.add_argument(
        "--max-chars",
        type=int,
        default=20_000,
        metavar="N",
        help="analyse the first N characters of the text (default: 20000)",
    )
    common.add_which(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--png",
        default=None,
        metavar="OUT",
        help="also draw the best cell on its excerpt, with the probe, as a PNG",
    )
    p.set_defaults(run=run)


def read_text(data: str, data_dir=None) -> tuple[str, str]:
    from glasslstm.data import load_corpus

    """``(text, description)``: a file read whole, else a named corpus's validation split."""
    path = Path(data).expanduser()
    if path.is_file():
        raw, what = path.read_bytes(), str(data)
    else:
        corpus = load_corpus(data, data_dir=data_dir)  # DataError for a missing file
        raw, what = corpus.val, f"the validation split of {corpus.name}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} is not valid UTF-8 (at byte {e.start}: {e.reason}); re-encode it as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{what} is empty (or only whitespace); give it some text to look at")
    return text, what


def run(args) -> int:
    from glasslstm.inspection.analysis import analyze
    from glasslstm.inspection.cells import find_cells, plot_cells, probe_function
    from glasslstm.model import LanguageModel

    options.check_args(args, OPTIONS)
    probe_function(args.probe)  # a bad regex fails before the model runs
    model = LanguageModel.load(args.run_dir, which=args.which)
    layers = None
    if args.layer is not None:
        n = model.config.num_layers
        if not 0 <= args.layer < n:
            raise ConfigError(
                f"--layer {args.layer} is out of range: the model has {n} "
                f"layer{'s' if n > 1 else ''} (0..{n - 1})"
            )
        layers = [args.layer]
    text, what = read_text(args.data, args.data_dir)
    cut = len(text) > args.max_chars
    text = text[: args.max_chars]
    tok = model.require_tokenizer()
    tok.encode_bytes(text.encode("utf-8"), what=what)  # a vocabulary without <unk>: names the file
    unknown = tok.unknown(text)
    if unknown:
        print(unknown_note(tok, unknown, what), file=sys.stderr)
    analysis = analyze(model, text, top_k=1)
    report = find_cells(
        analysis, args.probe, quantity=args.quantity, layers=layers, excerpts=min(SHOWN, args.top)
    )
    if args.png:
        plot_cells(report, args.png)
    if args.json:
        out = {
            "run": str(args.run_dir),
            "data": what,
            "chars": len(analysis.text),
            "truncated": cut or analysis.truncated,
            **report.to_json(top=args.top),
        }
        if args.png:
            out["png"] = str(args.png)
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    n_layers = len(layers) if layers else analysis.num_layers
    first = f"the first {len(analysis.text):,} characters of " if cut or analysis.truncated else ""
    print(
        f"probe {args.probe!r} over {first}{what}: {len(analysis):,} tokens "
        f"({len(analysis.text):,} characters); {len(report.scores)} cells of "
        f"{args.quantity} in {n_layers} layer{'s' if n_layers > 1 else ''}, ranked by "
        "Pearson r"
    )
    print(format_table(report.scores[: args.top]))
    color = sys.stdout.isatty()
    for ex in report.excerpts:
        print()
        print(format_excerpt(ex, report.probe, color=color))
    if args.png:
        print(f"\nwrote {args.png}")
    return 0


def _unicode_ok() -> bool:
    """Whether stdout can print the block characters (not on an ASCII/latin-1 terminal)."""
    try:
        (BLOCKS + "↵→").encode(getattr(sys.stdout, "encoding", None) or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def format_table(scores) -> str:
    """rank, layer, cell, r and a bar of |r| (20 characters = 1)."""
    lines = ["  rank  layer  cell        r"]
    for k, c in enumerate(scores, 1):
        bar = ("█" if _unicode_ok() else "#") * round(abs(c.r) * 20)
        lines.append(f"  {k:>4}  {c.layer:>5}  {c.cell:>4}  {c.r:+.4f}  {bar}")
    return "\n".join(lines)


def _rgb(x: float) -> tuple[int, int, int]:
    """Blue (low) - white - red (high), like matplotlib's RdBu_r, for x in [0, 1]."""
    lo, mid, hi = (33, 102, 172), (247, 247, 247), (178, 24, 43)
    a, b, t = (lo, mid, x * 2) if x < 0.5 else (mid, hi, x * 2 - 1)
    r, g, b_ = (round(p + (q - p) * t) for p, q in zip(a, b))
    return r, g, b_


def format_excerpt(ex, probe: str, *, color: bool = False, width: int = WIDTH) -> str:
    from glasslstm.inspection.cells import display_token

    """The excerpt shaded by the cell: ANSI background colours (``color``), or rows of text
    with a row of blocks (the cell) and a row of blocks (the probe) under each."""
    lo, hi = ex.color_range()
    head = (
        f"layer {ex.layer} cell {ex.cell} (r = {ex.r:+.3f}), tokens {ex.start}-"
        f"{ex.start + len(ex.tokens) - 1}, shaded by {ex.quantity} from {lo:+.2f} to {hi:+.2f}"
    )
    shade = ex.shade()
    if color:
        out = []
        for tok, x in zip(ex.tokens, shade):
            r, g, b = _rgb(float(x))
            fg = "30" if abs(x - 0.5) < 0.3 else "97"
            out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[{fg}m{display_token(tok)}\x1b[0m")
            if tok.endswith("\n"):
                out.append("\n")
        return head + ":\n" + "".join(out).rstrip("\n")
    blocks = BLOCKS if _unicode_ok() else "0123456789"
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    s_lo, s_hi = min(ex.signal), max(ex.signal)
    rows = [["", "", ""]]  # text, cell blocks, probe blocks
    for tok, x, s in zip(ex.tokens, shade, ex.signal):
        shown = display_token(tok) if blocks is BLOCKS else tok.encode(enc, "replace").decode(enc)
        shown = shown.replace("\n", "|").replace("\t", " ")  # only where blocks can't print
        ps = (s - s_lo) / (s_hi - s_lo) if s_hi > s_lo else 0.0
        for ch in shown:  # wrap at `width`, and after each newline
            if len(rows[-1][0]) >= width:
                rows.append(["", "", ""])
            row = rows[-1]
            row[0] += ch
            row[1] += blocks[min(int(x * len(blocks)), len(blocks) - 1)]
            row[2] += blocks[min(int(ps * len(blocks)), len(blocks) - 1)]
        if tok.endswith("\n"):
            rows.append(["", "", ""])
    lines = [head + f" (rows: text, cell, probe {probe!r}):"]
    for text, cells, probes in (r for r in rows if r[0]):
        lines += [f"  text  {text}", f"  cell  {cells}", f"  probe {probes}", ""]
    return "\n".join(lines).rstrip("\n")

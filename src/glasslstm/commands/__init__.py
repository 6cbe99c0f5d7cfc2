"""One module per `glasslstm` subcommand: ``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

from glasslstm.data import Tokenizer


def unknown_note(tok: Tokenizer, unknown: int, where: str) -> str:
    """The note that ``unknown`` characters (words) of ``where`` have no token of their own."""
    s = "" if unknown == 1 else "s"
    return (
        f"glasslstm: note: {unknown:,} {tok.unit}{s} of {where} not in the model's vocabulary, "
        "read as its unknown symbol"
    )

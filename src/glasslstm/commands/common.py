"""What several commands share: the run directory, which weights, int8 inference, the note
about text the vocabulary lacks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glasslstm.data import Tokenizer

RUN_HELP = "a run directory (from `glasslstm train` or LanguageModel.save)"


def add_run_dir(p) -> None:
    p.add_argument("run_dir", metavar="RUN", help=RUN_HELP)


def add_which(p) -> None:
    p.add_argument(
        "--which",
        choices=("best", "last"),
        default="best",
        help="the saved weights to use: best (lowest validation loss) or last (the latest "
        "checkpoint) (default: best)",
    )


def add_quantize(p) -> None:
    p.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="int8: round the weights to 8-bit integers, one scale per output row, before "
        "running (the one-token step reads them as int8: faster, a quarter of the weight "
        "memory; see docs/quantize.md) (default: float32 as saved)",
    )


def load_model(args, **kwargs):
    """The model of ``args.run_dir`` (``--which``), int8-quantized if ``--quantize int8``."""
    from glasslstm.model import LanguageModel

    model = LanguageModel.load(args.run_dir, which=args.which, **kwargs)
    if getattr(args, "quantize", None):
        from glasslstm.quantize import quantize

        quantize(model, args.quantize)
    return model


def unknown_note(tok: Tokenizer, unknown: int, where: str) -> str:
    """The note that ``unknown`` characters (words) of ``where`` have no token of their own."""
    s = "" if unknown == 1 else "s"
    return (
        f"glasslstm: note: {unknown:,} {tok.unit}{s} of {where} not in the model's vocabulary, "
        "read as its unknown symbol"
    )

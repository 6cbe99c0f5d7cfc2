"""Options several commands share: the run directory, which weights, int8 inference."""

from __future__ import annotations

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

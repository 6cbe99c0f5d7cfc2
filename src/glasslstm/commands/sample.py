"""glasslstm sample: generate text from a trained model, streamed as it is produced."""

from __future__ import annotations

import sys

from glasslstm import options
from glasslstm.model import LanguageModel

OPTIONS = {**options.SAMPLING, "device": options.DEVICE}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text from a trained model",
        description="Generate text, printing it as it is produced.",
    )
    p.add_argument(
        "run_dir",
        metavar="RUN",
        help="a run directory (from `glasslstm train` or LanguageModel.save)",
    )
    p.add_argument("--prompt", default="", help="text to start from (default: a newline)")
    p.add_argument("--length", type=int, default=500, help="tokens to generate (default: 500)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="0 is the argmax (the article's prediction); higher is more varied (default: 0.8)",
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--which", choices=("best", "last"), default="best", help="which saved model")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.set_defaults(run=run)


def run(args) -> int:
    options.check_args(args, OPTIONS)
    model = LanguageModel.load(args.run_dir, which=args.which, device=args.device)
    pieces = model.generate(
        args.prompt,
        args.length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    out = sys.stdout
    out.write(args.prompt)
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0

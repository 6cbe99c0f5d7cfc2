"""glasslstm eval: loss, perplexity and bits per character of a model on a text."""

from __future__ import annotations

import json
from pathlib import Path

from glasslstm import options, runfiles
from glasslstm.errors import DataError
from glasslstm.model import LanguageModel, training_data
from glasslstm.trainer import chars_per_token, evaluate

OPTIONS = {"batch_size": options.EVALUATION["batch_size"], "seq_len": options.EVALUATION["seq_len"]}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per character on a text",
        description="Evaluate a trained model. --data FILE evaluates the whole "
        "file; a corpus name (stories, shakespeare) or no --data evaluates that "
        "corpus's validation split (the run's own corpus by default).",
    )
    p.add_argument(
        "run_dir",
        metavar="RUN",
        help="a run directory (from `glasslstm train` or LanguageModel.save)",
    )
    p.add_argument("--data", default=None, help="a text file, or a named corpus")
    p.add_argument("--data-dir", default=None, help="where named corpora are looked up")
    p.add_argument("--which", choices=("best", "last"), default="best", help="which saved model")
    p.add_argument("--batch-size", type=int, default=32, help="rows evaluated in parallel")
    p.add_argument(
        "--seq-len", type=int, default=256, help="steps per chunk (the state carries over)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    options.check_args(args, OPTIONS)
    model = LanguageModel.load(args.run_dir, which=args.which)
    tok = model.require_tokenizer()
    if args.data and Path(args.data).is_file():
        data = Path(args.data).read_bytes()
        if not data.strip():
            raise DataError(f"{args.data} is empty (or only whitespace); nothing to evaluate")
        what = args.data
    else:
        # a model saved from Python records no training text: then --data must name one
        trained_on, trained_dir = training_data(args.run_dir, required=not args.data)
        moved = f"give it with `glasslstm eval {args.run_dir} --data PATH`"
        corpus = runfiles.load_run_corpus(
            args.run_dir,
            args.data or trained_on,
            args.data_dir or trained_dir,
            moved_fix=moved,
        )
        data, what = corpus.val, f"the validation split of {corpus.name}"
    ids = tok.encode_bytes(data, what=what)
    res = evaluate(
        model,
        ids,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        chars_per_token=chars_per_token(tok, data, len(ids)),
    )
    res["data"] = what
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{what}: {res['tokens']:,} tokens ({tok.level} level)")
        print(f"  loss       {res['loss']:.4f} nats/token")
        print(f"  perplexity {res['perplexity']:.3f}")
        print(f"  bpc        {res['bpc']:.4f} bits/character")
    return 0

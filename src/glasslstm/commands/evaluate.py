"""glasslstm eval: loss, perplexity and bits per character of a model on a text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from glasslstm import options
from glasslstm.commands import common
from glasslstm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from glasslstm.data import Corpus

OPTIONS = {
    "batch_size": options.EVALUATION["batch_size"],
    "seq_len": options.EVALUATION["seq_len"],
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per character on a text",
        description="Evaluate a trained model. --data FILE evaluates the whole "
        "file; a corpus name (stories, shakespeare), a folder, or no --data evaluates that "
        "corpus's validation split, or its test split with --split test (the run's own "
        "corpus by default). Characters (words, at word level) the model has no token for "
        "are read as its unknown symbol and counted.",
    )
    common.add_run_dir(p)
    p.add_argument("--data", default=None, help="a text file, or a named corpus")
    p.add_argument("--data-dir", default=None, help="where named corpora are looked up")
    p.add_argument(
        "--split",
        choices=("valid", "test"),
        default=None,
        help="which split of the corpus to score: valid (validation) or test (default: valid)",
    )
    common.add_which(p)
    common.add_quantize(p)
    p.add_argument("--batch-size", type=int, default=32, help="rows evaluated in parallel")
    p.add_argument(
        "--seq-len", type=int, default=256, help="steps per chunk (the state carries over)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from glasslstm import runfiles
    from glasslstm.model import training_data, training_splits
    from glasslstm.trainer import chars_per_token, evaluate

    options.check_args(args, OPTIONS)
    model = common.load_model(args)
    tok = model.require_tokenizer()
    if args.data and Path(args.data).is_file():
        if args.split:
            raise ConfigError(
                f"--split {args.split} picks a split of a corpus, but --data {args.data} is a "
                "file, evaluated whole; leave out --split, or give a corpus or folder"
            )
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
            splits=None if args.data else training_splits(args.run_dir),
        )
        data, what = _split(corpus, args.split or "valid")
    ids = tok.encode_bytes(data, what=what)
    unknown = tok.unknown(data.decode("utf-8", errors="replace"))
    res = evaluate(
        model,
        ids,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        chars_per_token=chars_per_token(tok, data, len(ids)),
    )
    res["data"] = what
    res["unknown"] = unknown
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        per = "word" if tok.level == "word" else "token"
        print(f"{what}: {res['tokens']:,} tokens ({tok.level} level)")
        print(f"  loss       {res['loss']:.4f} nats/token")
        print(f"  perplexity {res['perplexity']:.3f} per {per}")
        print(f"  bpc        {res['bpc']:.4f} bits/character")
        if unknown:
            print(f"  unknown    {unknown:,} {tok.unit}s not in the vocabulary (read as <unk>)")
    return 0


def _split(corpus: Corpus, split: str) -> tuple[bytes, str]:
    """The bytes of ``split`` (valid or test) of ``corpus``, and how to name them."""
    if split == "valid":
        return corpus.val, f"the validation split of {corpus.name}"
    if not corpus.test:
        raise DataError(
            f"{corpus.name} has no test split (only train and validation); train with "
            "--test FILE (or a folder holding a test file), or evaluate a file with --data FILE"
        )
    return corpus.test, f"the test split of {corpus.name} ({corpus.files.get('test', '')})"

"""glasslstm predict: the next tokens after a text, with their probabilities."""

from __future__ import annotations

import json
import sys

from glasslstm import options
from glasslstm.commands import common
from glasslstm.commands.common import unknown_note

OPTIONS = {"top": options.integer(1)}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="show the most likely next tokens after a text",
        description="The softmax over the hidden state, read out: the most "
        "likely next tokens after TEXT (and, for a character model, the next word).",
    )
    common.add_run_dir(p)
    p.add_argument("text", metavar="TEXT", help='e.g. "For his contributions, brave"')
    p.add_argument("--top", type=int, default=5, help="how many tokens to list (default: 5)")
    common.add_which(p)
    common.add_quantize(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    options.check_args(args, OPTIONS)
    model = common.load_model(args)
    tok = model.require_tokenizer()
    preds = model.predict_next(args.text, top=args.top)
    word = model.next_word(args.text) if tok.level != "word" else None
    unknown = tok.unknown(args.text)
    if args.json:
        out = {
            "text": args.text,
            "level": tok.level,
            "unknown": unknown,
            "next": [{"token": p.text, "prob": p.prob} for p in preds],
        }
        if word is not None:
            out["next_word"] = {"word": word[0], "prob": word[1]}
        print(json.dumps(out, indent=2))
        return 0
    if unknown:
        print(unknown_note(tok, unknown, "TEXT"), file=sys.stderr)
    print(f"after {args.text!r}:")
    width = max(len(p.token) for p in preds)
    for p in preds:
        bar = "#" * round(p.prob * 40)
        print(f"  {p.token:<{width}}  {p.prob:6.1%}  {bar}")
    if word is not None:
        print(f"most likely next word: {word[0]!r} (probability {word[1]:.2f}, greedy)")
    return 0

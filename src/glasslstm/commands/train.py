"""glasslstm train: train a language model; print validation bpc, a sample, a fill-in.

On the built-in stories (no --data) the defaults are :data:`glasslstm.article.RECIPE`, and after
training the article's tests and pictures follow (:func:`glasslstm.article.after_training`)."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import signal
import sys
from dataclasses import MISSING, fields
from typing import Any

from glasslstm import article
from glasslstm.errors import DataError
from glasslstm.model import LanguageModel
from glasslstm.trainer import TrainConfig, TrainResult, train

# The article's sentences: the fill-in on corpora other than `stories`, and the sample's start.
ARTICLE_PROMPT = "For his contributions, brave"
ARTICLE_START = "Bob is a nice person. Dan, on the other hand,"


def _field_help(cls) -> dict[str, str]:
    """The comment beside each default in the dataclass source: one text for code and --help."""
    found = re.findall(r"^\s+(\w+): [^=\n]+= [^#\n]+#\s*(.+)$", inspect.getsource(cls), re.M)
    return dict(found)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a language model on a corpus (default: the built-in stories)",
        description="Train an LSTM language model. Without --data it uses the built-in "
        "`stories` corpus. Every option has a default; see docs for tuned configurations.",
        argument_default=argparse.SUPPRESS,  # so that we know what was given explicitly
    )
    helps = _field_help(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        text = f"{helps.get(f.name, '')} (default: {default}"
        if f.name in article.RECIPE:  # the built-in stories have their own
            text += f"; on the built-in stories: {article.RECIPE[f.name]}"
        text = text.replace("%", "%%") + ")"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, metavar=f.name.upper(), help=text)
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the run in RUN (exactly where it stopped); with --data, from its "
        "training text at a new place (checked to be the same text)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object at the end, no progress bar"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the built-in stories: also train a vanilla RNN the same way and score both "
        "on the article's tests (default: on)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    as_json = getattr(args, "json", False)
    progress = not (as_json or getattr(args, "quiet", False))
    resume = getattr(args, "resume", None)
    if not as_json:
        where = f"resuming {resume}" if resume else "training"
        print(f"glasslstm: {where} ...", file=sys.stderr, flush=True)
    stories = given.get("data") in (None, "stories")
    base = article.train_config() if stories else TrainConfig()
    result = train(None if resume else base, resume=resume, overrides=given, progress=progress)
    finished = result.stopped not in ("interrupted", "diverged")
    report = _report(result, LanguageModel.load(result.run_dir)) if finished else result.to_json()
    if finished and report.get("corpus") == "stories":
        if not as_json:
            print("\nthe article's tests ...", file=sys.stderr, flush=True)
        report["article"] = article.after_training(
            result.run_dir,
            steps=result.step,
            compare=getattr(args, "compare", True),
            progress=progress,
        )
        rnn = report["article"].get("rnn", {})
        if rnn.get("stopped") == "interrupted":  # the LSTM is done; the RNN beside it is not
            result.stopped = "interrupted"
            result.interrupted_by = rnn.get("interrupted_by") or result.interrupted_by
            result.message = (
                f"the vanilla RNN compared with the LSTM was {rnn['message']}; "
                f"the LSTM's figures are above. `glasslstm train --resume {result.run_dir}` "
                "continues the RNN."
            )
    if as_json:
        print(json.dumps(report, indent=2, default=_json_default))
    else:
        _print_report(result, report)
    if result.stopped == "interrupted":  # 128 + the signal, as a shell reports it
        return 128 + int(getattr(signal, result.interrupted_by or "SIGINT"))
    return 1 if result.stopped == "diverged" else 0


def _json_default(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def _report(result: TrainResult, model: LanguageModel) -> dict:
    """The result plus a sample and fill-in-the-blank predictions of the best model."""
    report = result.to_json()
    corpus = json.loads((result.run_dir / "config.json").read_text("utf-8"))["corpus"]["name"]
    report["corpus"] = corpus
    prompt = ARTICLE_START if corpus == "stories" else ""
    report["sample_prompt"] = prompt
    report["sample"] = prompt + "".join(
        model.generate(prompt, 300, temperature=0.8, top_k=40, seed=1)
    )
    if corpus == "stories":
        return report  # the article's tests follow (article.after_training)
    fills: list[dict[str, Any]] = []
    try:
        word, prob = model.next_word(ARTICLE_PROMPT)
        fills.append({"prompt": ARTICLE_PROMPT, "answer": None, "predicted": word, "prob": prob})
    except DataError:
        pass  # the prompt has characters this corpus never had
    report["fill_in"] = fills
    return report


def _print_report(result: TrainResult, report: dict) -> None:
    stopped = result.stopped in ("interrupted", "diverged")
    if "article" not in report or not stopped:  # (else the RNN was stopped: said at the end)
        print(f"\n{result.message}", flush=True)
        if stopped:
            return
    print(f"run directory: {result.run_dir}")
    print(
        f"validation: {result.last_val_loss:.4f} nats/token, {result.last_val_bpc:.3f} bits per "
        f"character (best {result.best_val_bpc:.3f}), "
        f"perplexity {math.exp(result.last_val_loss):.2f}"
        if math.isfinite(result.last_val_loss)
        else "validation: not run"
    )
    print(f"speed: {result.tokens_per_s:,.0f} tokens/s over {result.seconds:.0f} s of training")
    if "sample" in report:
        print("\nsample (temperature 0.8, top-k 40):")
        print("  " + report["sample"].strip().replace("\n", "\n  "))
    fills = report.get("fill_in") or []
    if fills:
        f = fills[0]
        print("\nfill in the blank:")
        print(f"  {f['prompt']} ____")
        print(f"  -> {f['predicted']!r} with probability {f['prob']:.2f}")
    if "article" in report:
        print()
        print("\n".join(article.format_block(report["article"])))
    if stopped:
        print(f"\n{result.message}", flush=True)
        return
    print(
        f'\nnext: glasslstm sample {result.run_dir} --prompt "Bob" | '
        f'glasslstm predict {result.run_dir} "{ARTICLE_PROMPT}"'
    )

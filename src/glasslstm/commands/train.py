"""glasslstm train: train a language model; print validation bpc, a sample, a fill-in."""

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

from glasslstm import stories
from glasslstm.errors import DataError
from glasslstm.model import LanguageModel
from glasslstm.trainer import LEVEL_DEFAULTS, TrainConfig, TrainResult, train

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
        "`stories` corpus. --data FOLDER with train/valid/test files (train.txt, valid.txt, "
        "test.txt, wiki.train.tokens, ...) uses them as the splits; --train FILE --valid FILE "
        "--test FILE names them. The vocabulary comes from the training split; at the end the "
        "best model is scored on the test split. Every option has a default; some depend on "
        "--level (shown as char/word/byte). With --time-budget and no --max-steps, training "
        "runs for the budget.",
        argument_default=argparse.SUPPRESS,  # so that we know what was given explicitly
    )
    helps = _field_help(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        text = f"{helps.get(f.name, '')} (default: {_default_text(f.name, default)})"
        text = text.replace("%", "%%")  # argparse formats help strings with %
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
    p.set_defaults(run=run)


def _default_text(key: str, default) -> str:
    """A default as --help shows it: the value, or each level's where it depends on --level."""
    if key not in LEVEL_DEFAULTS["char"]:
        return str(default)
    by_level = {level: values[key] for level, values in LEVEL_DEFAULTS.items()}
    text = ", ".join(f"{level} {value}" for level, value in by_level.items())
    if key == "max_steps":
        text += "; 0 with --time-budget"
    return text


def run(args) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    as_json = getattr(args, "json", False)
    progress = not (as_json or getattr(args, "quiet", False))
    resume = getattr(args, "resume", None)
    if not as_json:
        where = f"resuming {resume}" if resume else "training"
        print(f"glasslstm: {where} ...", file=sys.stderr, flush=True)
    result = train(None, resume=resume, overrides=given, progress=progress)
    finished = result.stopped not in ("interrupted", "diverged")
    report = _report(result, LanguageModel.load(result.run_dir)) if finished else result.to_json()
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
    prompt = ARTICLE_START if corpus == "stories" else ""
    report["sample_prompt"] = prompt
    report["sample"] = prompt + "".join(
        model.generate(prompt, 300, temperature=0.8, top_k=40, seed=1)
    )
    if corpus == "stories":
        examples: list[tuple[str, str | None]] = list(stories.fill_in_examples(seed=0, n=20))
    else:
        examples = [(ARTICLE_PROMPT, None)]
    fills: list[dict[str, Any]] = []
    for prompt, answer in examples:
        try:
            word, prob = model.next_word(prompt)
        except DataError:
            continue  # the prompt has characters this corpus never had
        fill = {"prompt": prompt, "answer": answer, "predicted": word, "prob": prob}
        if answer is not None:
            fill["answer_prob"] = model.continuation_prob(prompt, " " + answer)
        fills.append(fill)
    report["fill_in"] = fills
    scored = [f for f in fills if f["answer"] is not None]
    if scored:
        report["fill_in_accuracy"] = sum(f["predicted"] == f["answer"] for f in scored) / len(
            scored
        )
        report["fill_in_answer_prob"] = sum(f["answer_prob"] for f in scored) / len(scored)
    return report


def _level(result: TrainResult) -> str:
    return json.loads((result.run_dir / "config.json").read_text("utf-8"))["train"]["level"]


def _print_report(result: TrainResult, report: dict) -> None:
    print(f"\n{result.message}", flush=True)
    if result.stopped in ("interrupted", "diverged"):
        return
    print(f"run directory: {result.run_dir}")
    if result.files:
        print("data: " + ", ".join(f"{split} {path}" for split, path in result.files.items()))
    per = "word" if _level(result) == "word" else "token"
    print(
        f"validation: {result.last_val_loss:.4f} nats/token, {result.last_val_bpc:.3f} bits per "
        f"character (best {result.best_val_bpc:.3f}), "
        f"perplexity {math.exp(result.last_val_loss):.2f} per {per}"
        if math.isfinite(result.last_val_loss)
        else "validation: not run"
    )
    if result.test is not None:
        t = result.test
        unknown = f"; {t['unknown']:,} unknown" if t.get("unknown") else ""
        print(
            f"test ({result.files.get('test', 'the test split')}, best model, {t['tokens']:,} "
            f"tokens{unknown}): {t['loss']:.4f} nats/token, {t['bpc']:.3f} bits per character, "
            f"perplexity {t['perplexity']:.2f} per {per}"
        )
    print(f"speed: {result.tokens_per_s:,.0f} tokens/s over {result.seconds:.0f} s of training")
    if "sample" in report:
        print("\nsample (temperature 0.8, top-k 40):")
        print("  " + report["sample"].strip().replace("\n", "\n  "))
    fills = report.get("fill_in") or []
    if fills:
        f = fills[0]
        tail = f["prompt"][-160:]
        print("\nfill in the blank:")
        print(f"  ...{tail} ____")
        verdict = (
            ""
            if f["answer"] is None
            else ("  (right)" if f["predicted"] == f["answer"] else f"  (expected {f['answer']})")
        )
        print(f"  -> {f['predicted']!r} with probability {f['prob']:.2f}{verdict}")
        if "fill_in_accuracy" in report:
            n = len([x for x in fills if x["answer"] is not None])
            names = len(stories.MALE_NAMES)
            print(
                f"  over {n} held-out stories (the name came 100+ characters before the blank): "
                f"{report['fill_in_accuracy'] * n:.0f}/{n} right; the right name got probability "
                f"{report['fill_in_answer_prob']:.3f} on average (1/{names} = {1 / names:.3f} "
                "for a guess among the names of the right gender)"
            )
    print(
        f'\nnext: glasslstm sample {result.run_dir} --prompt "Bob" | '
        f'glasslstm predict {result.run_dir} "{ARTICLE_PROMPT}"'
    )

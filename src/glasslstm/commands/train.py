"""glasslstm train: train a language model; print validation bpc, a sample, a fill-in.

On the built-in stories (no --data) the defaults are :data:`glasslstm.article.RECIPE`, and after
training the article's tests and pictures follow (:func:`glasslstm.article.after_training`)."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from glasslstm import options
from glasslstm.config import LEVEL_DEFAULTS, STORIES_RECIPE, TRAIN_HELP, TrainConfig
from glasslstm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from glasslstm.model import LanguageModel
    from glasslstm.trainer import TrainResult

# The article's sentences: the fill-in on corpora other than `stories`, and the sample's start.
ARTICLE_PROMPT = "For his contributions, brave"
ARTICLE_START = "Bob is a nice person. Dan, on the other hand,"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a language model on a corpus (default: the built-in stories)",
        description="Train an LSTM language model and write it, with its checkpoints, "
        "metrics and a plot of the losses, to a run directory. Without --data it trains on "
        "the built-in stories corpus. --data FOLDER with train/valid/test files (train.txt, "
        "valid.txt, test.txt, wiki.train.tokens, ...) uses them as the splits; --train FILE "
        "--valid FILE --test FILE names them. The vocabulary comes from the training split; at "
        "the end the best model is scored on the test split. Every option has a default; some "
        "depend on --level (shown as char/word/byte). With --time-budget and no --max-steps, "
        "training runs for the budget. Ctrl-C (or SIGTERM) saves and stops, and --resume RUN "
        "continues exactly where the run stopped.",
        argument_default=argparse.SUPPRESS,  # so that we know what was given explicitly
    )
    metavars = {"data": "FILE|NAME", "data_dir": "DIR", "out": "DIR"}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = TRAIN_HELP[f.name]
        if f.default is not None or f.name in LEVEL_DEFAULTS["char"]:
            text += f" (default: {_default_text(f.name, f.default)}"
            if f.name in STORIES_RECIPE:  # the built-in stories have their own
                text += f"; on the built-in stories: {STORIES_RECIPE[f.name]}"
            text += ")"
        text = text.replace("%", "%%")  # argparse formats help strings with %
        rule = options.TRAIN[f.name]
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            metavar = metavars.get(f.name, f.name.upper())
            if rule.choices:
                metavar = "{" + ",".join(rule.choices) + "}"
            p.add_argument(flag, type=kind, metavar=metavar, help=text)
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
        "--nproc",
        type=int,
        metavar="N",
        help="train with N processes on this machine (data parallel: torchrun's agent, gloo "
        "on the CPU, one GPU each with CUDA); --batch-size stays the global batch, split "
        "among them. Several machines: torchrun, see docs/distributed.md (default: 1)",
    )
    p.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the built-in stories: also train a vanilla RNN the same way and score both "
        "on the article's tests (default: on)",
    )
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
    from glasslstm import article, distributed
    from glasslstm.model import LanguageModel
    from glasslstm.trainer import train

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    as_json = getattr(args, "json", False)
    progress = not (as_json or getattr(args, "quiet", False))
    resume = getattr(args, "resume", None)
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc != 1:
        return _launch(args, given, nproc)
    main = distributed.rank() == 0  # under torchrun, rank 0 alone prints
    if not as_json and main:
        where = f"resuming {resume}" if resume else "training"
        print(f"glasslstm: {where} ...", file=sys.stderr, flush=True)
    on_stories = given.get("data") in (None, "stories") and not given.get("train")
    # elsewhere no base: TrainConfig(**given) fills what was not given from --level's defaults
    base = article.train_config() if on_stories and not resume else None
    result = train(None if resume else base, resume=resume, overrides=given, progress=progress)
    finished = result.stopped not in ("interrupted", "diverged")
    if not main:
        return _status(result)
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
    return _status(result)


def _status(result: TrainResult) -> int:
    """The exit status: 0, 1 when diverged, 128 + the signal when interrupted."""
    if result.stopped == "interrupted":  # 128 + the signal, as a shell reports it
        return 128 + int(getattr(signal, result.interrupted_by or "SIGINT"))
    return 1 if result.stopped == "diverged" else 0


def _launch(args, given: dict, nproc: int) -> int:
    """``--nproc N``: the same command as N processes under torchrun's agent. What can be
    checked before they start is (one line, nothing started)."""
    from glasslstm import distributed, runfiles

    if nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes; got {nproc}")
    resume = getattr(args, "resume", None)
    if resume is not None:
        distributed.check_resume(resume, nproc)
        distributed.check_batch(runfiles.read_run_config(resume).train.batch_size, nproc)
    else:
        distributed.check_batch(given.get("batch_size", TrainConfig.batch_size), nproc)
    argv = []
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    argv += [flag for flag in ("--json", "--quiet") if getattr(args, flag[2:], False)]
    return distributed.launch(nproc, argv)


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


def _level(result: TrainResult) -> str:
    return json.loads((result.run_dir / "config.json").read_text("utf-8"))["train"]["level"]


def _print_report(result: TrainResult, report: dict) -> None:
    from glasslstm import article

    stopped = result.stopped in ("interrupted", "diverged")
    if "article" not in report or not stopped:  # (else the RNN was stopped: said at the end)
        print(f"\n{result.message}", flush=True)
        if stopped:
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

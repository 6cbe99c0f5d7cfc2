"""The article's two examples as a test of a trained language model.

The article argues with two sentences: after "Bob is a nice person. Dan, on the other hand, is
evil." the network must know the text is now about Dan (the next sentence starts "He"), and
"Bob fought the enemy alone and died for his country. For his contributions, brave ____" must be
filled with the name seen long before. :func:`evaluate` scores a model on both, over held-out
stories (:func:`glasslstm.stories.held_out`: a seed stream the corpus never uses, the name at
least 30 words before the blank, someone else in between) and over :data:`WRITTEN`, sentences
written by hand in the article's style rather than by the generator.

A prediction is the model's greedy next word (:meth:`LanguageModel.next_word`): right when it is
exactly the hero's name (the fill-in) or the switched-to person's pronoun ("He"/"She").

:data:`RECIPE` is how ``glasslstm train`` trains on the built-in stories, and
:func:`after_training` what it does next: the same training for a vanilla RNN with about as
many parameters (:func:`train_rnn`), both models scored, and the article's two pictures drawn
from the LSTM (:mod:`glasslstm.inspection.article`). Why the recipe is what it is:
docs/inspect.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from glasslstm import rundir, stories
from glasslstm.config import STORIES_RECIPE
from glasslstm.data import DataError
from glasslstm.model import LanguageModel, ModelConfig
from glasslstm.trainer import TrainConfig, TrainResult, train
from glasslstm.viz import read_metrics

__all__ = [
    "HELD_OUT",
    "MIN_WORDS",
    "RECIPE",
    "WRITTEN",
    "Case",
    "after_training",
    "cases",
    "evaluate",
    "rnn_hidden",
    "train_config",
    "train_rnn",
]

RECIPE = STORIES_RECIPE  # glasslstm train's configuration for the built-in stories
CHANCE = {  # a guess that knows the gender: the pronoun "his"/"her", or nothing
    "fill_in_accuracy": 1 / len(stories.MALE_NAMES),
    "pronoun_accuracy": 0.5,
}

HELD_OUT = 200  # held-out stories scored after training
MIN_WORDS = 30  # the hero's name at least this many words before the blank
HELD_OUT_SEED = 0  # of stories.held_out: a seed stream the corpus never draws from


@dataclass(frozen=True)
class Case:
    """One question: ``prompt`` ends where the model must say ``answer`` (its next word)."""

    kind: str  # "fill-in" (the name after "brave") or "pronoun" (after a subject switch)
    prompt: str
    answer: str


# Written by hand, not by the generator: the article's own sentences, other wordings of the
# deed, and other people (of the same gender too) between the name and the blank. Most words
# are ones the stories use; a few are not ("firefighter", "school", "bravery": <unk> to a
# word-level model), as in text a person writes.
WRITTEN = (
    Case("pronoun", "Bob is a nice person. Dan, on the other hand, is evil.", "He"),
    Case("pronoun", "Dan is a nice person. Alice, on the other hand, is evil.", "She"),
    Case(
        "pronoun", "Kate is a good friend of mine. Sam, on the other hand, lies to everyone.", "He"
    ),
    Case(
        "pronoun",
        "Bob can swim. He told me over the phone that he had served in the Navy for four long "
        "years. Mary, on the other hand, never left Rome.",
        "She",
    ),
    Case(
        "fill-in",
        "Bob fought the enemy alone and died for his country. For his contributions, brave",
        "Bob",
    ),
    Case(
        "fill-in",
        "Bob can swim. He told me over the phone that he had served in the Navy for four long "
        "years. For his contributions, brave",
        "Bob",
    ),
    Case(
        "fill-in",
        "Bob fought the enemy alone and died for his country. Dan, on the other hand, is evil. "
        "He lies to everyone. He never helps anyone. He hid at the station during the war. "
        "For his contributions, brave",
        "Bob",
    ),
    Case(
        "fill-in",
        "Alice grew up in Paris. She saved three sailors from the sea during the storm. Clara, "
        "on the other hand, stayed at home. She likes cake more than people. Her brother "
        "works as a baker in Oslo. For her courage, brave",
        "Alice",
    ),
    Case(
        "fill-in",
        "Tom is a good friend of mine. He works as a doctor in Madrid. One day, he carried two "
        "children out of a burning house. Sam, on the other hand, is lazy and rude. He steals "
        "from his neighbours. Paul is the brother of Sam. He does not like his neighbours. "
        "For his service, brave",
        "Tom",
    ),
    Case(
        "fill-in",
        "Emma lives in Vienna with her mother. When the river flooded the town, she rescued "
        "everyone from the water. Linda, however, never helps anyone. She sold her car for a "
        "little money. Anna met Linda in Berlin. She only cares about her garden. For her "
        "contributions, brave",
        "Emma",
    ),
    Case(
        "fill-in",
        "Sam was a firefighter in Oslo. He ran into the burning school and saved ten children. "
        "Tom, on the other hand, is a coward. He hid at home during the fire. Kate is the sister "
        "of Tom. She works as a teacher. For his courage, brave",
        "Sam",
    ),
    Case(
        "fill-in",
        "Anna fought a wolf to protect the children. Beth, on the other hand, is lazy. She never "
        "helps anyone. Clara met Beth in Rome. She is a baker. For her contributions, brave",
        "Anna",
    ),
    Case(
        "fill-in",
        "Dan is my neighbour. He saved a family from a fire in Berlin. Bob, however, stayed at "
        "home. He likes cake more than people. He never left Rome. For his contributions, brave",
        "Dan",
    ),
    Case(
        "fill-in",
        "Kate grew up in Madrid with her father. She led the soldiers home through the snow. "
        "Emma, on the other hand, ran away from the enemy. She lies to everyone. Linda is the "
        "sister of Emma. For her bravery, brave",
        "Kate",
    ),
    Case(
        "fill-in",
        "Paul fought the enemy alone and died for his country. Sam, on the other hand, is evil. "
        "Tom, however, is lazy and rude. For his contributions, brave",
        "Paul",
    ),
    Case("pronoun", "Alice saved a family from a fire. Bob, however, stayed at home.", "He"),
    Case("pronoun", "Tom is a nice person. Kate, on the other hand, is evil.", "She"),
    Case(
        "pronoun",
        "Sam can swim. He served in the Navy. Paul, on the other hand, cannot swim.",
        "He",
    ),
    Case(
        "pronoun",
        "Anna is a doctor in Paris. She helps everyone. Beth, on the other hand, is a mean person.",
        "She",
    ),
)


def cases(held_out: list[stories.Story]) -> list[Case]:
    """Every question of the held-out stories: each story's fill-in, and the pronoun after each
    of its subject switches."""
    out = []
    for s in held_out:
        out.append(Case("fill-in", s.prompt, s.hero))
        out += [Case("pronoun", s.text[:end], pronoun) for end, pronoun in s.switches]
    return out


@torch.no_grad()
def _answer(model: LanguageModel, case: Case) -> dict:
    try:
        word, prob = model.next_word(case.prompt)
        p_answer = model.continuation_prob(case.prompt, " " + case.answer)
    except DataError:  # a character this model's vocabulary lacks
        word, prob, p_answer = "", 0.0, 0.0
    return {"predicted": word, "prob": prob, "answer_prob": p_answer, "right": word == case.answer}


@torch.no_grad()
def _answers_at_once(model: LanguageModel, questions: list[Case], chunk: int = 64) -> list:
    """:func:`_answer` of every question, for a word-level model whose answers are one token
    each: one batched forward per ``chunk`` questions instead of a few per question. The greedy
    next word after ``prompt`` is the most likely token after ``prompt + " "`` when the most
    likely token after ``prompt`` is that space (else the question is asked one by one)."""
    tok = model.require_tokenizer()
    space = tok.encode(" ")
    if tok.level != "word" or len(space) != 1:
        return [_answer(model, c) for c in questions]
    out: list = []
    with model._evaluating():
        for start in range(0, len(questions), chunk):
            part = questions[start : start + chunk]
            seqs = [tok.encode(c.prompt) + space for c in part]
            width = max(map(len, seqs))
            idx = torch.zeros(len(seqs), width, dtype=torch.long)
            for b, ids in enumerate(seqs):  # padded on the right: a causal model ignores it
                idx[b, : len(ids)] = torch.tensor(ids)
            logits, _, _ = model(idx.to(model.device))
            probs = torch.softmax(logits.float(), -1).cpu()
            for b, (case, ids) in enumerate(zip(part, seqs)):
                before, after = probs[b, len(ids) - 2], probs[b, len(ids) - 1]
                if int(before.argmax()) != space[0] or tok.encode(case.answer)[:1] == [0]:
                    out.append(_answer(model, case))  # not the one-token case: the slow way
                    continue
                i = int(after.argmax())
                word = tok.decode([i])
                word = word if word.strip() and (word.isalnum() or word in "'-") else ""
                p_space = float(before[space[0]])
                answer = tok.encode(case.answer)
                p_answer = p_space * float(after[answer[0]]) if len(answer) == 1 else 0.0
                out.append(
                    {
                        "predicted": word,
                        "prob": p_space * float(after[i]) if word else p_space,
                        "answer_prob": p_answer,
                        "right": word == case.answer,
                    }
                )
    return out


def score(model: LanguageModel, questions: list[Case]) -> dict:
    """Accuracy per kind: ``{"fill_in_accuracy", "pronoun_accuracy", "fill_in_answer_prob",
    "n", "n_pronoun", "answers": [...]}`` (``n``: the fill-in questions)."""
    if isinstance(model, LanguageModel):
        found = _answers_at_once(model, questions)
    else:  # anything with next_word and continuation_prob
        found = [_answer(model, c) for c in questions]
    answers = [{"kind": c.kind, "answer": c.answer, **a} for c, a in zip(questions, found)]
    out: dict = {}
    for kind, key in (("fill-in", "fill_in"), ("pronoun", "pronoun")):
        mine = [a for a in answers if a["kind"] == kind]
        out[f"{key}_accuracy"] = sum(a["right"] for a in mine) / len(mine) if mine else None
        out[f"{key}_answer_prob"] = (
            sum(a["answer_prob"] for a in mine) / len(mine) if mine else None
        )
        out["n" if kind == "fill-in" else "n_pronoun"] = len(mine)
    out["answers"] = answers
    return out


def evaluate(model: LanguageModel, *, n: int = HELD_OUT, min_words: int = MIN_WORDS) -> dict:
    """The model on ``n`` held-out stories and on :data:`WRITTEN`: ``{"fill_in_accuracy",
    "pronoun_accuracy", "n", ..., "written": {...}}`` (see :func:`score`)."""
    held = stories.held_out(HELD_OUT_SEED, n, min_words=min_words)
    out = score(model, cases(held))
    out["min_words"] = min_words
    out["written"] = score(model, list(WRITTEN))
    out["written"]["answers"] = [
        {"prompt": c.prompt, **a} for c, a in zip(WRITTEN, out["written"]["answers"])
    ]
    del out["answers"]
    return out


# ------------------------------------------------------------------------------ the main job


def train_config(**overrides) -> TrainConfig:
    """:data:`RECIPE` as a :class:`TrainConfig`, with ``overrides`` on top. With another
    ``batching`` than the recipe's, its curriculum and answer weights (which act on windows of
    whole documents) are left out unless given too."""
    recipe = dict(RECIPE)
    if overrides.get("batching", recipe["batching"]) != "documents":
        for key in ("curriculum", "answers", "answer_weight"):
            recipe.pop(key)
    return TrainConfig(**{**recipe, **overrides})


def _parameters(config: ModelConfig) -> int:
    return LanguageModel(config).num_parameters()


def rnn_hidden(config: ModelConfig) -> int:
    """The hidden size of a vanilla RNN with about as many parameters as ``config``'s LSTM
    language model (everything else the same): the size whose count comes closest."""
    target = _parameters(config)

    def count(h: int) -> int:
        embed = config.embed_size or h
        return _parameters(
            ModelConfig(
                vocab_size=config.vocab_size,
                hidden_size=h,
                num_layers=config.num_layers,
                dropout=config.dropout,
                embed_size=embed if config.embed_size else 0,
                tie_weights=config.tie_weights,
                cell="rnn",
            )
        )

    lo, hi = 1, 8 * config.hidden_size  # count() grows with h: bisect for the crossing
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    return min((lo - 1, lo), key=lambda h: abs(count(h) - target) if h >= 1 else math.inf)


def train_rnn(run_dir, *, steps: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or continue) the vanilla RNN compared with the LSTM of ``run_dir``, in
    ``run_dir/rnn``: the LSTM's training configuration with ``cell="rnn"`` and the hidden size
    of :func:`rnn_hidden` (no chrono initialisation: it is the LSTM's forget gate), for
    ``steps`` optimizer steps (default: the LSTM's ``max_steps``; no time budget, so that both
    see the same batches). An RNN run already there is continued to ``steps``."""
    run_dir = Path(run_dir)
    out = run_dir / "rnn"
    stored = rundir.read_config(run_dir)
    cfg = TrainConfig.from_dict(stored["train"])
    max_steps = steps or cfg.max_steps
    if (out / "config.json").is_file():
        overrides = {"max_steps": max_steps, "time_budget": 0.0}
        return train(resume=out, overrides=overrides, progress=progress)
    hidden = rnn_hidden(ModelConfig.from_dict(stored["model"]))
    rnn = replace(
        cfg,
        cell="rnn",
        hidden=hidden,
        chrono_init=0,
        out=str(out),
        max_steps=max_steps,
        time_budget=0.0,
    )
    return train(rnn, progress=progress)


def best_val_loss(run_dir) -> float:
    """The lowest validation loss (nats per token) in ``run_dir``'s metrics."""
    losses = [
        r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("split") == "val"
    ]
    return min(losses) if losses else math.nan


def _summary(model: LanguageModel, run_dir, result: dict) -> dict:
    return {
        "fill_in_accuracy": result["fill_in_accuracy"],
        "pronoun_accuracy": result["pronoun_accuracy"],
        "n": result["n"],
        "n_pronoun": result["n_pronoun"],
        "fill_in_answer_prob": result["fill_in_answer_prob"],
        "val_loss": best_val_loss(run_dir),
        "parameters": model.num_parameters(),
        "hidden": model.config.hidden_size,
        "written": {k: v for k, v in result["written"].items() if k != "answers"},
        "run_dir": str(run_dir),
    }


def after_training(
    run_dir, *, steps: int | None = None, compare: bool = True, progress: bool = True
) -> dict:
    """What ``glasslstm train`` does after training on the stories: the ``"article"`` block of
    its report. Scores the LSTM of ``run_dir`` (and, with ``compare``, a vanilla RNN trained the
    same way for the LSTM's ``steps``, :func:`train_rnn`) on the held-out stories and
    :data:`WRITTEN`, and draws the article's two pictures into ``run_dir/article``."""
    from glasslstm.inspection.article import draw_pictures

    run_dir = Path(run_dir)
    lstm = LanguageModel.load(run_dir)
    scored = evaluate(lstm)
    block: dict = {"min_words": MIN_WORDS, "chance": CHANCE}
    block["lstm"] = _summary(lstm, run_dir, scored)
    block["written"] = scored["written"]["answers"]
    if compare:
        result = train_rnn(run_dir, steps=steps, progress=progress)
        if result.stopped in ("interrupted", "diverged"):
            block["rnn"] = {
                "stopped": result.stopped,
                "message": result.message,
                "interrupted_by": result.interrupted_by,
            }
        else:
            rnn = LanguageModel.load(result.run_dir)
            block["rnn"] = _summary(rnn, result.run_dir, evaluate(rnn))
    block["pictures"] = draw_pictures(lstm, run_dir / "article")
    return block


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def format_block(block: dict) -> list[str]:
    """The ``"article"`` block as lines for a terminal: the table and where the pictures are."""
    lstm = block["lstm"]
    lines = [
        f"the article's two tests, on {lstm['n']} held-out stories (the name {block['min_words']}+ "
        "words before the blank, someone else in between) and sentences written by hand:",
        "",
        f"  {'model':<22}{'parameters':>11}  {'fill-in (brave ____)':>22}  "
        f"{'pronoun after a switch':>23}  {'validation loss':>16}",
    ]
    rows = [("LSTM", lstm)]
    if "rnn" in block:
        rows.append(("vanilla RNN", block["rnn"]))
    for name, r in rows:
        if "fill_in_accuracy" not in r:
            lines.append(f"  {name:<22}{r.get('message', r.get('stopped', ''))}")
            continue
        fill = f"{_pct(r['fill_in_accuracy'])} ({round(r['fill_in_accuracy'] * r['n'])}/{r['n']})"
        pron = (
            f"{_pct(r['pronoun_accuracy'])} "
            f"({round(r['pronoun_accuracy'] * r['n_pronoun'])}/{r['n_pronoun']})"
        )
        label = f"{name} 1x{r['hidden']}"
        lines.append(
            f"  {label:<22}{r['parameters']:>11,}  {fill:>22}  {pron:>23}  "
            f"{r['val_loss']:>10.3f} nats"
        )
    chance = block["chance"]
    lines.append(
        f"  {'chance (knowing gender)':<22}{'':>11}  {_pct(chance['fill_in_accuracy']):>22}  "
        f"{_pct(chance['pronoun_accuracy']):>23}"
    )
    written = []
    for name, r in rows:
        w = r.get("written")
        if w:
            written.append(
                f"{name} {round(w['fill_in_accuracy'] * w['n'])}/{w['n']} fill-in, "
                f"{round(w['pronoun_accuracy'] * w['n_pronoun'])}/{w['n_pronoun']} pronoun"
            )
    if written:
        lines.append("  written by hand (glasslstm.article.WRITTEN): " + "; ".join(written))
    pictures = block.get("pictures") or {}
    if pictures:
        lines += ["", "the article's pictures (PNG, and an interactive page):"]
        for key, what in (("switch", "the subject switch"), ("blank", "the blank")):
            if key in pictures:
                p = pictures[key]
                lines.append(f"  {what + ':':<20}{p['png']}  {p['html']}")
    return lines

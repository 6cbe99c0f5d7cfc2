"""Subject tracking: fill the article's blank with a name introduced T tokens earlier.

A word-level task built from the sentence templates and names of :mod:`glasslstm.stories`
(the article's examples). One sample, ``T`` tokens, all samples of a batch the same length::

    Bob can swim . He served in the Navy for four long years .      <- the hero, at token 0
    Dan , on the other hand , is evil . He lives in Rome . ...      <- distractors, topic switches
    ... Time passed .                                               <- filler to hit T exactly
    For his contributions , brave                                   <- the blank follows: "Bob"

- The hero's name is token 0 and appears nowhere else; the blank would be token T, so the name
  is exactly T tokens before it. The model's output at the last step (input "brave") is scored.
- Everything between is other sentences: at most two more about the hero (pronouns only, when
  room is left for a distractor after them), then episodes about OTHER people (never the
  hero's name; either gender, so the pronoun alone does not single the hero out), each opened
  by a subject switch at a full stop ("Dan , on the other hand , ..."), then neutral filler
  sentences of 3 to 5 tokens that make the length exactly T. Every sample has at least one
  distractor.
- "his"/"her" in the closing (and every hero pronoun) agrees with the hero's gender.

Input: one-hot word ids over :attr:`SubjectTask.vocab` (``input_size = len(vocab)``); the
names come first in the vocabulary, so a name's class is its word id. Output: logits over the
``len(NAMES)`` names, scored at the final step only. Chance (``baseline``): a guesser that
reads the pronoun and picks a name of that gender uniformly is right with probability
sum_g P(g) / n_g = 1/2 * 1/32 + 1/2 * 1/32 = 1/32. Solved: held-out accuracy > 0.95.

Generation is a Python loop over sentences with one uniform draw per decision, the draws taken
from the passed ``torch.Generator`` in blocks, so a batch is a deterministic function of the
generator's state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

# The stories' grammar: the same names and sentences as the built-in corpus, so the two never
# drift apart.
from ..stories import (
    CHOICES,
    CLOSE_OPEN,
    FEMALE_NAMES,
    HERO_DEED,
    HERO_INTRO,
    HERO_MORE,
    KIN,
    MALE_NAMES,
    OTHER_MORE,
    PRONOUNS,
    SECOND_INTRO,
    SECOND_MORE,
    SWITCH,
)
from .base import check_batch_size, check_T

__all__ = ["NAMES", "SubjectTask"]

NAMES = MALE_NAMES + FEMALE_NAMES  # the classes; word ids 0 .. len(NAMES) - 1
GENDERS = ("m", "f")
# Neutral sentences (no names, no pronouns) of 3, 4 and 5 tokens: any remainder >= 3 is a sum
# of these, so every sample ends exactly at T.
FILLERS = {
    3: ("Time passed .", "Nothing happened .", "Winter came .", "Spring came ."),
    4: ("Years went by .", "It rained again .", "The war ended ."),
    5: ("The town was quiet .", "Many years went by .", "It rained for days ."),
}
SECOND_PROB = 0.3  # chance an episode adds a second distractor, as in the stories
MIN_FILL = min(FILLERS)

_TOKEN = re.compile(r"\{\w+\}|\w+|[^\w\s]")  # placeholders, words, single punctuation marks
_NAME, _OTHER = -1, -2  # slots in a compiled template: the sentence's person, the other person


def _words(text: str) -> list[str]:
    return _TOKEN.findall(text)


class _Grammar:
    """The templates compiled to word ids, once per gender: lists of parts, each an int (a word
    id, or a name slot _NAME / _OTHER) or a tuple of options (each a tuple of word ids)."""

    def __init__(self):
        groups = {
            "intro": HERO_INTRO,
            "more": HERO_MORE + HERO_DEED,
            "switch": SWITCH,
            "other_more": OTHER_MORE,
            "second_intro": SECOND_INTRO,
            "second_more": SECOND_MORE,
            # the article's "For his contributions, brave" keeps its weight by repetition
            "close": tuple(t for t, w in CLOSE_OPEN for _ in range(w)),
        }
        words = {w for texts in FILLERS.values() for t in texts for w in _words(t)}
        words |= {w for opts in CHOICES.values() for o in opts for w in _words(o)}
        words |= {w for kin in KIN.values() for k in kin for w in _words(k)}
        words |= {w for p in PRONOUNS.values() for w in p.values()}
        words |= {w for ts in groups.values() for t in ts for w in _words(t) if w[0] != "{"}
        clash = words & set(NAMES)
        if clash:  # a name that is also an ordinary word would make the task ambiguous
            raise AssertionError(f"names used as ordinary words: {sorted(clash)}")
        self.vocab = list(NAMES) + sorted(words)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.names = {
            g: tuple(self.ids[n] for n in (MALE_NAMES if g == "m" else FEMALE_NAMES))
            for g in GENDERS
        }
        self.templates = {
            g: {k: [self._compile(t, g) for t in ts] for k, ts in groups.items()} for g in GENDERS
        }
        self.fillers = {
            n: [tuple(self.ids[w] for w in _words(t)) for t in ts] for n, ts in FILLERS.items()
        }
        self.max_len = {
            k: max(self._max_len(p) for g in GENDERS for p in self.templates[g][k]) for k in groups
        }
        self.min_T = (
            self.max_len["intro"] + self.max_len["switch"] + MIN_FILL + self.max_len["close"]
        )

    def _compile(self, template: str, g: str) -> list:
        parts = []
        for w in _words(template):
            if w[0] != "{":
                parts.append(self.ids[w])
                continue
            key = w[1:-1]
            if key == "N":
                parts.append(_NAME)
            elif key == "other":
                parts.append(_OTHER)
            elif key in PRONOUNS[g]:
                parts.extend(self.ids[x] for x in _words(PRONOUNS[g][key]))
            else:
                options = KIN[g] if key == "kin" else CHOICES[key]
                parts.append(tuple(tuple(self.ids[x] for x in _words(o)) for o in options))
        return parts

    @staticmethod
    def _max_len(parts: list) -> int:
        return sum(max(map(len, p)) if isinstance(p, tuple) else 1 for p in parts)


@lru_cache(maxsize=1)
def _grammar() -> _Grammar:
    return _Grammar()


class _Draws:
    """Uniform integers from a torch.Generator: float64 uniforms drawn in blocks, one per call."""

    def __init__(self, generator: torch.Generator, block: int):
        self.generator, self.block, self.pos = generator, block, 0
        self.buf: list[float] = []

    def uniform(self) -> float:
        """A uniform float in [0, 1)."""
        if self.pos == len(self.buf):
            block = torch.rand(self.block, generator=self.generator, dtype=torch.float64)
            self.buf = block.tolist()
            self.pos = 0
        self.pos += 1
        return self.buf[self.pos - 1]

    def __call__(self, n: int) -> int:
        """A uniform integer in [0, n)."""
        return min(int(self.uniform() * n), n - 1)


class SubjectTask:
    """Subject tracking over ``T`` tokens (T >= :attr:`min_T`): x ``(B, T, len(vocab))``
    float32 one-hot, target ``(B,)`` int64 name class (== the name's word id), mask None."""

    name: ClassVar[str] = "subject"
    kind: ClassVar[str] = "classification"
    solved_accuracy: ClassVar[float] = 0.95

    def __init__(self, T: int):
        self.grammar = _grammar()
        self.min_T = self.grammar.min_T
        self.T = check_T(self.name, T, self.min_T)
        self.vocab: list[str] = self.grammar.vocab
        self.names: tuple[str, ...] = NAMES
        self.input_size = len(self.vocab)
        self.output_size = len(NAMES)
        n = {g: len(self.grammar.names[g]) for g in GENDERS}
        self.baseline = sum(0.5 / n[g] for g in GENDERS)  # chance given the pronoun, see above

    def __repr__(self) -> str:
        return f"SubjectTask(T={self.T})"

    @property
    def seq_len(self) -> int:
        return self.T

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Word ids (or a name class) as text, words separated by spaces."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int):
            ids = [ids]
        return " ".join(self.vocab[i] for i in ids)

    def gender_of(self, name_id: int) -> str:
        return "m" if name_id in self.grammar.names["m"] else "f"

    # ---------------------------------------------------------------------- generation
    def token_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(ids (B, T) int64 word ids, target (B,) int64)``; :meth:`batch` one-hots ``ids``."""
        B = check_batch_size(batch_size)
        draw = _Draws(generator, block=max(1024, B * self.T // 2))
        rows, heroes = [], []
        for _ in range(B):
            row, hero = self._sample(draw)
            rows.append(row)
            heroes.append(hero)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(heroes, dtype=torch.long)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, None]:
        """``(x (B, T, len(vocab)) float32 one-hot, target (B,) int64, None)``."""
        ids, target = self.token_batch(batch_size, generator)
        # scatter into float32 directly: F.one_hot would build an int64 tensor twice the size
        x = torch.zeros(*ids.shape, self.input_size).scatter_(-1, ids.unsqueeze(-1), 1.0)
        return x, target, None

    def _person(self, draw: _Draws, exclude: tuple[int, ...]) -> tuple[int, str]:
        g = GENDERS[draw(2)]
        pool = self.grammar.names[g]
        name = pool[draw(len(pool))]
        while name in exclude:
            name = pool[draw(len(pool))]
        return name, g

    def _sentence(self, draw: _Draws, kind: str, g: str, name: int, other: int = -1) -> list[int]:
        options = self.grammar.templates[g][kind]
        out = []
        for part in options[draw(len(options))]:
            if isinstance(part, tuple):
                out.extend(part[draw(len(part))])
            elif part >= 0:
                out.append(part)
            else:
                out.append(name if part == _NAME else other)
        return out

    def _sample(self, draw: _Draws) -> tuple[list[int], int]:
        """One sample: (T word ids, the hero's id)."""
        hero, hg = self._person(draw, ())
        row = self._sentence(draw, "intro", hg, hero)
        close = self._sentence(draw, "close", hg, hero)
        room = self.T - len(row) - len(close)  # tokens left for the middle
        keep_for_switch = self.grammar.max_len["switch"] + MIN_FILL

        for _ in range(1 + draw(2)):  # one or two more about the hero, if a distractor still fits
            s = self._sentence(draw, "more", hg, hero)
            if room - len(s) >= keep_for_switch:
                row += s
                room -= len(s)

        def fits(s: list[int]) -> bool:  # the rest must stay fillable: 0 or >= MIN_FILL tokens
            return len(s) == room or len(s) <= room - MIN_FILL

        first, full = True, False
        while room and not full:  # distractor episodes, up to the first sentence that won't fit
            other, og = self._person(draw, (hero,))
            episode = [self._sentence(draw, "switch", og, other)]
            episode += [self._sentence(draw, "other_more", og, other) for _ in range(1 + draw(3))]
            if draw.uniform() < SECOND_PROB:
                second, sg = self._person(draw, (hero, other))
                episode.append(self._sentence(draw, "second_intro", sg, second, other))
                episode.append(self._sentence(draw, "second_more", sg, second))
            for s in episode:
                if not (first or fits(s)):  # the first switch always fits: T >= min_T
                    full = True
                    break
                row += s
                room -= len(s)
                first = False
        while room:  # fill the rest exactly with 3-5 token sentences
            sizes = [n for n in self.grammar.fillers if n == room or n <= room - MIN_FILL]
            n = sizes[draw(len(sizes))]
            options = self.grammar.fillers[n]
            row += options[draw(len(options))]
            room -= n
        return row + close, hero

    # ---------------------------------------------------------------------- scoring
    def _final(self, pred: Tensor) -> Tensor:
        if pred.dim() != 3 or pred.shape[-1] != self.output_size:
            raise ValueError(
                f"subject: pred must be (B, L, {self.output_size}), got {tuple(pred.shape)}"
            )
        return pred[:, -1]  # only the last step (input "brave") is scored

    def loss(self, pred: Tensor, target: Tensor, mask=None) -> Tensor:
        """Cross-entropy of the final step's name logits."""
        return F.cross_entropy(self._final(pred), target)

    @torch.no_grad()
    def metric(self, pred: Tensor, target: Tensor, mask=None) -> dict[str, float]:
        """``{"accuracy", "loss"}`` at the final step."""
        logits = self._final(pred)
        return {
            "accuracy": float((logits.argmax(-1) == target).float().mean()),
            "loss": float(F.cross_entropy(logits, target)),
        }

    def solved(self, metric: dict[str, float]) -> bool:
        return metric["accuracy"] > self.solved_accuracy

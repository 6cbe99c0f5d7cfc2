"""Training windows made of whole documents, a short-first curriculum, and answer weights.

:class:`~glasslstm.data.TokenStream` cuts a corpus into ``batch_size`` long rows and carries
the state from one window to the next (truncated BPTT over the whole stream). For a corpus of
independent documents — paragraphs separated by a blank line, like the built-in stories — it
can be better to start every window at the beginning of a document, from the zero state: the
model then never has to learn where a document ends from the state it is carrying, and every
dependency inside a document (up to the window length) is trained in full.

:class:`DocumentBatches` does that: each row of a batch is whole documents drawn at random,
one after the other, cut to ``seq_len + 1`` tokens. Two options make a curriculum:

- ``curriculum`` steps at the start draw only from the shortest quarter of the documents, in
  windows of half the length: a long-range skill (recalling a name) is first learned where the
  dependency is short and cheap, then extended to the whole corpus;
- ``answers``, a regular expression over the text, marks answer tokens (the tokens whose last
  character lies inside a match, or inside its last group if it has groups); their targets
  weigh ``answer_weight`` in the loss, every other target 1.

Batches are a deterministic function of ``(seed, step)``, so a resumed run sees the same ones.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from glasslstm.data import Tokenizer
from glasslstm.errors import ConfigError, DataError

__all__ = ["DocumentBatches", "answer_mask", "token_offsets"]

SEPARATOR = re.compile(r"\n[ \t]*\n\s*")  # a blank line (and any whitespace after it)
CURRICULUM_FRACTION = 0.25  # during the curriculum: the shortest quarter of the documents


def token_offsets(tok: Tokenizer, ids: np.ndarray) -> tuple[str, np.ndarray]:
    """``(text, ends)``: the tokens' texts joined, and the index in it just past each token.
    (For a byte-level tokenizer, a byte outside ASCII counts as one character.)"""
    byte = tok.level == "byte"
    pieces = ["\ufffd" if byte and i >= 128 else tok.decode([i]) for i in range(tok.vocab_size)]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    ends = np.cumsum(lengths[ids]) if len(ids) else np.zeros(0, dtype=np.int64)
    return "".join(pieces[i] for i in ids.tolist()), ends


def answer_mask(text: str, ends: np.ndarray, pattern: str) -> np.ndarray:
    """``(len(ends),)`` bool: the tokens whose last character lies inside a match of
    ``pattern`` in ``text`` (inside its last group when it has groups)."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--answers {pattern!r} is not a valid regular expression: {e}") from None
    inside = np.zeros(len(text) + 1, dtype=bool)
    for m in compiled.finditer(text):
        group = m.lastindex or 0
        if m.start(group) >= 0:
            inside[m.start(group) : m.end(group)] = True
    return inside[np.maximum(ends - 1, 0)] & (ends > 0)


class DocumentBatches:
    """Batches of whole documents: ``batch(step) -> (x, y, weights)``, each ``(B, T)``.

    ``ids``: the training split as token ids; ``tok``: its tokenizer (to find the blank lines
    and the answers in the text). ``weights`` is None when no ``answers`` pattern is given.
    """

    def __init__(
        self,
        ids: np.ndarray,
        tok: Tokenizer,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        curriculum: int = 0,
        answers: str = "",
        answer_weight: float = 1.0,
        what: str = "the training split",
    ):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.curriculum = curriculum
        text, ends = token_offsets(tok, self.ids)
        token_start = np.concatenate([[0], ends[:-1]])
        cuts = [m.end() for m in SEPARATOR.finditer(text)]
        first = np.searchsorted(token_start, np.array(cuts, dtype=np.int64), side="left")
        bounds = np.unique(np.concatenate([[0], first[first < len(self.ids)], [len(self.ids)]]))
        self.docs = np.stack([bounds[:-1], bounds[1:]], axis=1)  # (D, 2): [start, end) tokens
        if len(self.docs) < 2:
            raise DataError(
                f"--batching documents needs documents separated by blank lines; {what} has "
                f"{len(self.docs)}. Use --batching stream, or separate the documents with a "
                "blank line"
            )
        lengths = self.docs[:, 1] - self.docs[:, 0]
        self.by_length = np.argsort(lengths, kind="stable")
        self.short = self.by_length[: max(1, int(len(self.docs) * CURRICULUM_FRACTION))]
        self.weights: np.ndarray | None = None
        self.answers = 0  # answer tokens in the text
        if answers:
            mask = answer_mask(text, ends, answers)
            self.answers = int(mask.sum())
            self.weights = np.where(mask, float(answer_weight), 1.0).astype(np.float32)

    def __len__(self) -> int:
        return len(self.docs)

    def window(self, step: int) -> int:
        """The window length at ``step``: half of ``seq_len`` during the curriculum."""
        return max(1, self.seq_len // 2) if step < self.curriculum else self.seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x, y, weights)`` for optimizer step ``step``: ``y`` is ``x`` shifted by one token;
        ``weights[b, t]`` weighs the target ``y[b, t]`` (None without answers)."""
        rng = np.random.default_rng([self.seed, step])
        pool = self.short if step < self.curriculum else self.by_length
        T = self.window(step)
        rows = np.empty((self.batch_size, T + 1), dtype=np.int64)
        picks = []
        for b in range(self.batch_size):
            parts, n = [], 0
            while n < T + 1:
                start, end = self.docs[pool[rng.integers(len(pool))]]
                parts.append(np.arange(start, end))
                n += end - start
            picks.append(np.concatenate(parts)[: T + 1])
            rows[b] = self.ids[picks[-1]]
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(rows[:, 1:].copy())
        if self.weights is None:
            return x, y, None
        w = np.stack([self.weights[p[1:]] for p in picks])
        return x, y, torch.from_numpy(w)

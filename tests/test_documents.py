"""Windows of whole documents, a short-first curriculum, answer weights (glasslstm.documents)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from glasslstm import stories
from glasslstm.data import Corpus, DataError, build_tokenizer
from glasslstm.documents import DocumentBatches, answer_mask, token_offsets
from glasslstm.errors import ConfigError

DOCS = [
    "Bob can swim. For his courage, brave Bob was thanked.",
    "Ann is kind. Dan, on the other hand, is evil. He lies. For her service, brave Ann was made a "
    "hero.",
    "Tom lives in Rome. For his contributions, brave Tom is remembered.",
    "Eve sings. Max, however, never helps. He steals. Sam is a friend of Max. For her courage, "
    "brave Eve was given a medal.",
]
TEXT = "\n\n".join(DOCS * 5) + "\n"


def tokenizer(level: str):
    return build_tokenizer(level, Corpus("t", TEXT.encode(), b"", "test"), min_freq=1)


@pytest.mark.parametrize("level", ["char", "word", "byte"])
def test_windows_start_at_documents_and_hold_whole_ones(level):
    tok = tokenizer(level)
    ids = tok.encode_bytes(TEXT.encode())
    text, ends = token_offsets(tok, ids)
    assert text == TEXT and ends[-1] == len(TEXT)
    b = DocumentBatches(ids, tok, batch_size=6, seq_len=40, seed=3)
    assert len(b) == len(DOCS) * 5
    starts = {int(s) for s, _ in b.docs}
    for step in range(4):
        x, y, w = b.batch(step)
        assert x.shape == y.shape == (6, 40) and w is None and x.dtype == torch.long
        for row_x, row_y in zip(x, y):
            assert torch.equal(row_x[1:], row_y[:-1])  # y is x shifted by one token
            first = tok.decode(row_x.tolist())
            assert any(first.startswith(d[:10]) for d in DOCS), first  # a document's start
            # inside the window, documents follow each other whole: "...\n\nNext"
            for piece in first.split("\n\n")[1:-1]:
                assert piece in DOCS
    again = DocumentBatches(ids, tok, 6, 40, seed=3).batch(2)  # as a resumed run would
    assert torch.equal(b.batch(2)[0], again[0]) and torch.equal(b.batch(2)[1], again[1])
    assert not torch.equal(b.batch(2)[0], b.batch(3)[0])
    assert starts == {int(s) for s in b.docs[:, 0]}


def test_curriculum_draws_the_shortest_documents_in_half_windows():
    tok = tokenizer("word")
    ids = tok.encode_bytes(TEXT.encode())
    b = DocumentBatches(ids, tok, batch_size=8, seq_len=64, curriculum=5)
    lengths = b.docs[:, 1] - b.docs[:, 0]
    shortest = lengths.min()
    assert len(b.short) == len(b) // 4 and set(lengths[b.short]) == {shortest}
    for step in range(5):
        x, _, _ = b.batch(step)
        assert x.shape == (8, 32) and b.window(step) == 32
        text = tok.decode(x[0].tolist())
        assert text.startswith(DOCS[0][:20])  # the shortest story, again and again
    assert b.batch(5)[0].shape == (8, 64) and b.window(5) == 64
    seen = {tok.decode(x[:12].tolist()) for step in range(5, 40) for x in b.batch(step)[0]}
    assert len(seen) == len(DOCS)  # then every document


def test_answers_weigh_the_targets_they_mark():
    tok = tokenizer("word")
    ids = tok.encode_bytes(TEXT.encode())
    text, ends = token_offsets(tok, ids)
    mask = answer_mask(text, ends, stories.ANSWERS)
    marked = [tok.decode([int(i)]) for i in ids[mask]]
    assert marked[:4] == [
        "Bob",
        "He",
        "Ann",
        "Tom",
    ]  # the blanks' names, the pronoun after a switch
    assert len(marked) == 5 * (4 + 2)
    b = DocumentBatches(ids, tok, 4, 48, answers=stories.ANSWERS, answer_weight=50.0)
    assert b.answers == len(marked)
    for step in range(3):
        x, y, w = b.batch(step)
        assert w.shape == y.shape and w.dtype == torch.float32
        for row_x, row_y, row_w in zip(x, y, w):
            window = np.concatenate([row_x[:1].numpy(), row_y.numpy()])  # the T + 1 tokens
            joined, window_ends = token_offsets(tok, window)
            expected = answer_mask(joined, window_ends, stories.ANSWERS)[1:]
            assert expected.any()
            assert ((row_w == 50.0).numpy() == expected).all() and (row_w[~expected] == 1).all()


def test_answer_mask_uses_the_last_group_and_char_offsets():
    tok = tokenizer("char")
    text = "ab cd ef"
    ids = np.array(tok.encode(text.replace("f", "e")), dtype=np.int64)  # "ab cd ee"
    joined, ends = token_offsets(tok, ids)
    assert answer_mask(joined, ends, r"c(d)").tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert answer_mask(joined, ends, r"ab").tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ConfigError, match="--answers '\\(' is not a valid regular expression"):
        answer_mask(joined, ends, "(")


def test_a_text_without_blank_lines_is_refused():
    tok = tokenizer("char")
    ids = tok.encode_bytes(re.sub(r"\n+", " ", TEXT).encode())
    with pytest.raises(DataError, match="--batching documents needs documents separated by blank"):
        DocumentBatches(ids, tok, 2, 16)

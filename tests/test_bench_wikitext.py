"""The WikiText-style benchmark's split, vocabulary and scoring (no training, no peer)."""

from __future__ import annotations

import math

import pytest

from glasslstm.bench.wikitext import (
    ARTICLE,
    bpc,
    make_split,
    parse_peer,
    replace_unknown,
    split_articles,
    words,
)


def wikitext(n_articles: int, lines_each: int = 4) -> str:
    """A text laid out as WikiText is: articles under `` = Title = ``, sections under
    `` = = Section = = ``, blank lines around headings."""
    out = []
    for a in range(n_articles):
        out += [" \n", f" = Article {a} = \n", " \n", f" = = Part of {a} = = \n"]
        out += [f" word{a} shared text line {k} . \n" for k in range(lines_each)]
    return "".join(out)


def test_split_keeps_articles_whole_and_cuts_after_80_and_90_percent():
    text = wikitext(20)
    train, valid, test = split_articles(text)
    assert train + valid + test == text  # nothing lost, nothing reordered
    n = text.count("\n")
    # each split starts with an article's heading, never a section's (two '=')
    for part in (valid, test):
        assert ARTICLE.match(part.splitlines()[0])
    assert train.count("\n") >= 0.8 * n - 1
    assert train.count("\n") + valid.count("\n") >= 0.9 * n - 1


def test_split_refuses_a_text_without_enough_articles():
    with pytest.raises(ValueError, match="article headings"):
        split_articles(" = Only = \n" + "some words .\n" * 50)


def test_unknown_words_become_unk_and_spacing_is_kept():
    text, n = replace_unknown(
        " the cat sat on <unk> mat \n\n a dog \n", {"the", "cat", "a", "<unk>"}
    )
    assert text == " the cat <unk> <unk> <unk> <unk> \n\n a <unk> \n"
    assert n == 4  # the literal <unk> was already one
    assert words(text) == ["the", "cat"] + ["<unk>"] * 4 + ["<eos>", "<eos>", "a", "<unk>", "<eos>"]


def test_make_split_uses_the_training_vocabulary_only(tmp_path):
    src = tmp_path / "wiki.txt"
    src.write_text(wikitext(20), encoding="utf-8")
    sizes = make_split(src, tmp_path / "data")
    train = (tmp_path / "data" / "train.txt").read_text(encoding="utf-8")
    vocab = set(train.split())
    for name in ("valid", "test"):
        text = (tmp_path / "data" / f"{name}.txt").read_text(encoding="utf-8")
        assert set(text.split()) <= vocab | {"<unk>"}
        # each article's own word is unseen in training: one per line of its body
        assert sizes[name]["replaced_by_unk"] > 0
        assert sizes[name]["words"] == len(words(text))
        assert sizes[name]["chars"] == len(text)


def test_bpc_is_nats_per_word_over_characters_per_word_in_bits():
    # 2 words over 10 characters at ln(2) * 5 nats/word: 1 bit per character
    assert bpc(math.log(2) * 5, 2, 10) == pytest.approx(1.0)


PEER_LOG = """\
| epoch   1 |   200/  257 batches | lr 20.00 | ms/batch 190.05 | loss  7.35 | ppl  1556.23
-----------------------------------------------------------------------------------------
| end of epoch   1 | time: 52.44s | valid loss  6.61 | valid ppl   743.24
-----------------------------------------------------------------------------------------
| end of epoch   2 | time: 51.90s | valid loss  6.20 | valid ppl   492.75
-----------------------------------------------------------------------------------------
Exiting from training early
=========================================================================================
| End of training | test loss  5.19 | test ppl   179.87
=========================================================================================
"""


def test_parse_peer_reads_test_perplexity_and_epochs():
    res = parse_peer(PEER_LOG)
    assert res["perplexity"] == 179.87
    assert res["loss"] == pytest.approx(math.log(179.87))  # more digits than the printed loss
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    assert res["epochs"][1]["valid_loss"] == 6.20


def test_parse_peer_says_why_when_no_epoch_finished():
    with pytest.raises(SystemExit, match="no epoch"):
        parse_peer(PEER_LOG.split("-----")[0] + "Exiting from training early\n")

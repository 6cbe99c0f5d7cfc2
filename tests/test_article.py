"""The article's tests of a trained model (glasslstm.article): scoring, the RNN to compare
with, the report block."""

from __future__ import annotations

import pytest

from glasslstm import article, stories
from glasslstm.data import Corpus, build_tokenizer, load_corpus
from glasslstm.errors import ConfigError
from glasslstm.model import LanguageModel, ModelConfig


class Oracle:
    """A stand-in for a model: answers from a table (the right answer, or a wrong one)."""

    def __init__(self, right: set[str]):
        self.right = right  # prompts it answers rightly

    def next_word(self, prompt):
        answer = ANSWERS[prompt]
        return (answer, 0.9) if prompt in self.right else ("Zed", 0.5)

    def continuation_prob(self, prompt, continuation):
        return 0.9 if prompt in self.right else 0.01


ANSWERS: dict[str, str] = {}


def test_score_counts_each_kind_of_question():
    held = stories.held_out(0, 10)
    questions = article.cases(held)
    fills = [q for q in questions if q.kind == "fill-in"]
    pronouns = [q for q in questions if q.kind == "pronoun"]
    assert len(fills) == 10 and len(pronouns) == sum(len(s.switches) for s in held)
    assert all(q.answer in ("He", "She") for q in pronouns)
    assert [q.answer for q in fills] == [s.hero for s in held]
    ANSWERS.update({q.prompt: q.answer for q in questions})
    right = {q.prompt for q in fills[:7]} | {q.prompt for q in pronouns[:-1]}
    result = article.score(Oracle(right), questions)
    assert result["fill_in_accuracy"] == pytest.approx(0.7) and result["n"] == 10
    assert result["pronoun_accuracy"] == pytest.approx((len(pronouns) - 1) / len(pronouns))
    assert result["n_pronoun"] == len(pronouns)
    assert result["fill_in_answer_prob"] == pytest.approx(0.7 * 0.9 + 0.3 * 0.01)
    assert [a["right"] for a in result["answers"][:2]] == [True, True]


@pytest.mark.slow
def test_written_sentences_are_in_the_stories_style():
    """The hand-written questions are in the article's style, not in a vocabulary the model
    never saw: their answers are words of the default corpus's word vocabulary, and all but a
    few of their words are too (a person's text has some the stories lack)."""
    c = load_corpus("stories")
    tok = build_tokenizer("word", Corpus("s", c.train, c.val, "test"))
    unknown = []
    for case in article.WRITTEN:
        assert 0 not in tok.encode(" " + case.answer), case.answer
        unknown += [w for w in tok.PATTERN.findall(case.prompt) if w not in tok.stoi]
    assert 0 < len(unknown) <= 5, unknown
    kinds = [c.kind for c in article.WRITTEN]
    assert kinds.count("fill-in") >= 10 and kinds.count("pronoun") >= 8
    # the article's own two sentences are among them
    prompts = " ".join(c.prompt for c in article.WRITTEN)
    assert "Bob is a nice person. Dan, on the other hand, is evil." in prompts
    assert "Bob fought the enemy alone and died for his country. For his contributions," in prompts


@pytest.mark.parametrize("tie, layers, hidden", [(True, 1, 128), (False, 2, 64), (True, 1, 40)])
def test_the_rnn_has_about_as_many_parameters_as_the_lstm(tie, layers, hidden):
    cfg = ModelConfig(vocab_size=337, hidden_size=hidden, num_layers=layers, tie_weights=tie)
    h = article.rnn_hidden(cfg)
    lstm = LanguageModel(cfg).num_parameters()
    rnn_cfg = ModelConfig(
        vocab_size=337, hidden_size=h, num_layers=layers, tie_weights=tie, cell="rnn"
    )
    rnn = LanguageModel(rnn_cfg).num_parameters()
    assert abs(rnn - lstm) / lstm < 0.02 and h > hidden


def test_format_block_prints_the_table():
    row = {
        "fill_in_accuracy": 0.975,
        "pronoun_accuracy": 1.0,
        "n": 200,
        "n_pronoun": 300,
        "val_loss": 0.6,
        "parameters": 175_569,
        "hidden": 128,
        "written": {"fill_in_accuracy": 1.0, "n": 6, "pronoun_accuracy": 0.75, "n_pronoun": 4},
    }
    rnn = {**row, "fill_in_accuracy": 0.035, "pronoun_accuracy": 0.5, "hidden": 232}
    block = {
        "min_words": 30,
        "chance": article.CHANCE,
        "lstm": row,
        "rnn": rnn,
        "pictures": {
            "switch": {"png": "r/article/switch.png", "html": "r/article/switch.html"},
            "blank": {"png": "r/article/blank.png", "html": "r/article/blank.html"},
        },
    }
    text = "\n".join(article.format_block(block))
    assert "200 held-out stories (the name 30+ words before the blank" in text
    assert "97.5% (195/200)" in text and "100.0% (300/300)" in text and "175,569" in text
    assert "3.5% (7/200)" in text and "50.0% (150/300)" in text and "vanilla RNN 1x232" in text
    assert "LSTM 6/6 fill-in, 3/4 pronoun" in text
    assert "r/article/switch.png" in text and "r/article/blank.html" in text


def test_the_recipe_and_its_overrides():
    cfg = article.train_config()
    assert cfg.level == "word" and cfg.batching == "documents" and cfg.answers == stories.ANSWERS
    assert article.train_config(hidden=64).hidden == 64
    stream = article.train_config(batching="stream")  # no curriculum or answers without documents
    assert stream.curriculum == 0 and stream.answers == "" and stream.chrono_init == 64
    with pytest.raises(ConfigError, match="add --batching documents"):
        article.train_config(batching="stream", curriculum=10)

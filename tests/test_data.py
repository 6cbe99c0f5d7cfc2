"""Corpora, tokenizers and TBPTT batching (glasslstm.data, glasslstm.stories)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from glasslstm import data, stories
from glasslstm.data import (
    Corpus,
    DataError,
    TokenStream,
    build_tokenizer,
    load_corpus,
    split_bytes,
    tokenizer_from_dict,
)

FAKE = b"To be, or not to be: that is the question.\n" * 50
FAKE_SHA = hashlib.sha256(FAKE).hexdigest()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env var points outside tmp; the cache is tmp/cache/glasslstm; no network."""
    monkeypatch.delenv("GLASSLSTM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, timeout):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(data, "_download", offline)
    return tmp_path


def _corpus(text: str | bytes) -> Corpus:
    b = text.encode() if isinstance(text, str) else text
    train, val = split_bytes(b)
    return Corpus("test", train, val, "test")


# --------------------------------------------------------------------------- stories


def test_stories_deterministic_per_seed_and_different_across_seeds():
    a = stories.generate_stories(seed=3, n_stories=50)
    assert a == stories.generate_stories(seed=3, n_stories=50)
    assert a != stories.generate_stories(seed=4, n_stories=50)
    assert stories.fill_in_examples(1, 5) == stories.fill_in_examples(1, 5)
    assert stories.fill_in_examples(1, 5) != stories.fill_in_examples(2, 5)


@pytest.mark.slow
def test_stories_default_corpus_shape():
    c = load_corpus(None)
    assert c == load_corpus("stories")  # deterministic, seed 0
    text = (c.train + c.val).decode("ascii")  # plain ASCII
    assert 1_000_000 <= len(text) <= 2_000_000
    paras = text.strip("\n").split("\n\n")
    assert len(paras) == stories.DEFAULT_STORIES
    assert all(p and "\n" not in p for p in paras)
    names = set(stories.MALE_NAMES) | set(stories.FEMALE_NAMES)
    firsts = {p.split()[0] for p in paras}
    assert firsts <= names and len(firsts) >= 40  # varied names, both genders
    assert firsts & set(stories.MALE_NAMES) and firsts & set(stories.FEMALE_NAMES)
    # The article's structures.
    assert "Bob" in text and "Dan, on the other hand," in text
    assert "told me over the phone that he had served in the Navy for four long years." in text
    assert "For his contributions, brave" in text and "For her contributions, brave" in text
    assert load_corpus("stories", seed=1).train != c.train


def test_stories_pronouns_agree_with_the_name():
    text = stories.generate_stories(seed=0, n_stories=300)
    male, female = set(stories.MALE_NAMES), set(stories.FEMALE_NAMES)
    checked = 0
    for para in text.strip().split("\n\n"):
        sentences = re.split(r"(?<=\.) ", para)
        hero = sentences[0].split()[0]
        # Sentence 2 is about the hero and starts with a pronoun or possessive.
        first_word = sentences[1].split()[0]
        assert first_word in (("He", "His") if hero in male else ("She", "Her")), para
        # The subject switches at a full stop; what follows is about the new subject.
        m = re.search(r"\. (\w+), on the other hand, [^.]*\. (\w+) ", para)
        assert m, para
        other, pron = m.groups()
        assert other != hero and other in male | female
        if pron in ("He", "His", "She", "Her"):
            assert pron in (("He", "His") if other in male else ("She", "Her")), para
            checked += 1
        blank = re.search(r"For (his|her) \w+, brave (\w+) ", para)
        assert blank and blank.group(2) == hero
        assert blank.group(1) == ("his" if hero in male else "her")
    assert checked > 100


def test_fill_in_examples_answer_was_introduced_long_before_the_blank():
    examples = stories.fill_in_examples(seed=0, n=200)
    assert len(examples) == 200
    male = set(stories.MALE_NAMES)
    corpus = stories.generate_stories(seed=0, n_stories=200)
    for prompt, answer in examples:
        m = re.search(r"For (his|her) (contributions|courage|service), brave$", prompt)
        assert m, prompt
        assert m.group(1) == ("his" if answer in male else "her")
        assert prompt.startswith(answer + " ")
        last = prompt.rfind(answer)
        assert len(prompt) - (last + len(answer)) >= 100, prompt
        assert prompt not in corpus  # disjoint seed stream


# --------------------------------------------------------------------------- local corpora


def test_split_is_90_10_and_concatenates_to_the_whole(isolated):
    text = "".join(f"line {i}\n" for i in range(1000)).encode()
    f = isolated / "a.txt"
    f.write_bytes(text)
    c = load_corpus(str(f))
    assert c.train + c.val == text
    assert len(c.train) == int(len(text) * 0.9)
    assert c.name == str(f)


def test_split_never_cuts_a_utf8_character():
    data = "é".encode() * 10 + "€".encode() * 30  # 2- and 3-byte characters
    for n in range(1, len(data) + 1):
        train, val = split_bytes(data[:n])
        assert train + val == data[:n]
        if val:
            assert val[0] & 0xC0 != 0x80  # not a continuation byte


def test_folder_of_txt_files_sorted_and_joined_with_a_blank_line(isolated):
    d = isolated / "texts"
    d.mkdir()
    (d / "b.txt").write_text("second file\n")
    (d / "a.txt").write_text("first file")
    (d / "notes.md").write_text("ignored")
    c = load_corpus(str(d))
    assert (c.train + c.val).decode() == "first file\n\nsecond file\n"
    empty = isolated / "empty"
    empty.mkdir()
    (empty / "x.md").write_text("not txt")
    with pytest.raises(DataError, match=r"no \.txt files"):
        load_corpus(str(empty))


@pytest.mark.parametrize(
    "names",
    [
        ("train.txt", "valid.txt", "test.txt"),
        ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
        ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
        ("train.txt", "validation.txt", "test.txt"),
        ("train.txt", "dev.txt", "test.txt"),
    ],
)
def test_a_folder_of_split_files_is_read_as_those_splits(isolated, names):
    d = isolated / "corpus"
    d.mkdir()
    texts = [b"the training text\n" * 3, b"the validation text\n", b"the test text\n"]
    for name, text in zip(names, texts):
        (d / name).write_bytes(text)
    (d / "README.txt").write_text("about this corpus")  # not a split: left alone
    c = load_corpus(str(d))
    assert (c.train, c.val, c.test) == tuple(texts)  # each file as it is, never joined
    assert c.files == {
        split: str((d / name).resolve()) for split, name in zip(("train", "valid", "test"), names)
    }
    assert data.find_split_files(d) == {
        split: d / name for split, name in zip(("train", "valid", "test"), names)
    }


def test_split_files_named_one_by_one(isolated):
    train = isolated / "tr.txt"
    train.write_text("".join(f"line {i}\n" for i in range(100)))
    (isolated / "te.txt").write_text("held out\n")
    c = load_corpus(train=str(train), test=str(isolated / "te.txt"))
    # no validation file: the last 10% of the training file
    assert c.train + c.val == train.read_bytes() and len(c.val) < len(c.train) / 5
    assert c.test == b"held out\n" and set(c.files) == {"train", "test"}
    assert "last 10%" in c.source
    with pytest.raises(DataError, match="both name the text"):
        load_corpus("stories", train=str(train))
    with pytest.raises(DataError, match="need --train"):
        load_corpus(test=str(isolated / "te.txt"))
    with pytest.raises(DataError, match=r"the valid file .*nope\.txt.* does not exist"):
        load_corpus(train=str(train), valid=str(isolated / "nope.txt"))


@pytest.mark.parametrize(
    "names, problem",
    [
        (("train.txt", "wiki.train.tokens", "valid.txt"), r"2 files for the train split"),
        (("valid.txt", "test.txt"), r"no training file"),
        (("train_test.txt", "valid.txt"), r"names more than one split"),
    ],
)
def test_an_ambiguous_folder_is_one_line_naming_the_files(isolated, names, problem):
    d = isolated / "corpus"
    d.mkdir()
    for name in names:
        (d / name).write_text("some text\n")
    with pytest.raises(DataError, match=problem) as e:
        load_corpus(str(d))
    msg = str(e.value)
    assert "\n" not in msg and "--train FILE" in msg
    assert all(name in msg for name in names if name != "valid.txt" or "no training" in msg)


@pytest.mark.parametrize("content", [b"", b"  \n\t\n  "])
def test_empty_or_whitespace_file_is_an_error(isolated, content):
    f = isolated / "e.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match="empty or only whitespace"):
        load_corpus(str(f))


def test_missing_path_lists_the_named_corpora(isolated):
    with pytest.raises(DataError) as e:
        load_corpus(str(isolated / "nope.txt"))
    msg = str(e.value)
    assert "nope.txt" in msg and "stories" in msg and "shakespeare" in msg and "neither" in msg


def test_invalid_utf8_names_the_offset_and_suggests_byte_level(isolated):
    raw = b"hello world " * 10 + b"\xff\xfe" + b" more text" * 10
    f = isolated / "latin.txt"
    f.write_bytes(raw)
    c = load_corpus(str(f))  # loading accepts anything: byte level must work
    assert c.train + c.val == raw
    for level in ("char", "word"):
        with pytest.raises(DataError) as e:
            build_tokenizer(level, c)
        msg = str(e.value)
        assert "offset 120" in msg and "--level byte" in msg and "latin.txt" in msg
    tok = build_tokenizer("char", _corpus("abc"))
    with pytest.raises(DataError, match=r"my split.*offset 2.*--level byte"):
        tok.encode_bytes(b"ab\xc3(", what="my split")
    byte = build_tokenizer("byte", c)
    assert bytes(byte.encode_bytes(c.train).astype(np.uint8)) == c.train


# --------------------------------------------------------------------------- shakespeare


def test_shakespeare_from_data_dir_is_verified_and_split(isolated, monkeypatch):
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", FAKE_SHA)  # the test's own stand-in text
    (isolated / "given" / "tinyshakespeare").mkdir(parents=True)
    (isolated / "given" / "tinyshakespeare" / "input.txt").write_bytes(FAKE)
    c = load_corpus("shakespeare", data_dir=isolated / "given")
    assert c.train + c.val == FAKE and c.name == "shakespeare"
    assert len(c.train) == int(len(FAKE) * 0.9)
    assert not (isolated / "cache").exists()  # found, not downloaded


def test_shakespeare_lookup_order(isolated, monkeypatch):
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", FAKE_SHA)
    dirs = {k: isolated / k for k in ("given", "env", "cache")}
    (dirs["given"] / "tinyshakespeare").mkdir(parents=True)
    (dirs["given"] / "tinyshakespeare" / "input.txt").write_bytes(FAKE)
    dirs["env"].mkdir()
    (dirs["env"] / "tinyshakespeare.txt").write_bytes(FAKE)
    (dirs["cache"] / "glasslstm").mkdir(parents=True)
    (dirs["cache"] / "glasslstm" / "shakespeare.txt").write_bytes(FAKE)
    monkeypatch.setenv("GLASSLSTM_DATA", str(dirs["env"]))

    def where(c):
        return c.source.split(" from ")[1].split(" (")[0]

    c = load_corpus("shakespeare", data_dir=dirs["given"])
    assert where(c) == str(dirs["given"] / "tinyshakespeare" / "input.txt")
    assert c.train + c.val == FAKE
    assert where(load_corpus("shakespeare")) == str(dirs["env"] / "tinyshakespeare.txt")
    monkeypatch.delenv("GLASSLSTM_DATA")
    assert where(load_corpus("shakespeare")) == str(dirs["cache"] / "glasslstm" / "shakespeare.txt")


def test_shakespeare_checksum_mismatch_names_file_and_both_hashes(isolated):
    d = isolated / "given"
    d.mkdir()
    (d / "shakespeare.txt").write_bytes(FAKE)
    with pytest.raises(DataError) as e:
        load_corpus("shakespeare", data_dir=d)
    msg = str(e.value)
    assert str(d / "shakespeare.txt") in msg and FAKE_SHA in msg and data.SHAKESPEARE_SHA256 in msg


def test_shakespeare_offline_error_says_where_to_put_the_file(isolated):
    d = isolated / "given"
    with pytest.raises(DataError) as e:
        load_corpus("shakespeare", data_dir=d)
    msg = str(e.value)
    for name in data.SHAKESPEARE_NAMES:
        assert str(d / name) in msg
        assert str(isolated / "cache" / "glasslstm" / name) in msg
    assert "--data-dir" in msg and "GLASSLSTM_DATA" in msg and "unreachable" in msg


def test_shakespeare_download_is_saved_atomically_then_found_in_cache(isolated, monkeypatch):
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", FAKE_SHA)
    calls = []
    monkeypatch.setattr(data, "_download", lambda url, timeout: calls.append(url) or FAKE)
    target = isolated / "cache" / "glasslstm" / "tinyshakespeare" / "input.txt"
    replaced = []
    real_replace = os.replace

    def spy_replace(src, dst):
        # At the moment of the rename the temp file is complete, beside the target, and the
        # target does not exist yet: no reader can see a partial file.
        assert Path(src).parent == target.parent and Path(src).read_bytes() == FAKE
        assert not target.exists()
        replaced.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", spy_replace)
    c = load_corpus("shakespeare")
    assert c.train + c.val == FAKE and calls == [data.SHAKESPEARE_URL]
    assert replaced and Path(replaced[0][1]) == target
    assert target.read_bytes() == FAKE
    assert sorted(p.name for p in target.parent.iterdir()) == ["input.txt"]  # no temp left

    def offline(url, timeout):
        raise AssertionError("must not download again")

    monkeypatch.setattr(data, "_download", offline)
    c2 = load_corpus("shakespeare")
    assert c2 == Corpus(
        "shakespeare", c.train, c.val, f"tiny-shakespeare from {target} (sha256 verified)"
    )


def test_corrupt_download_is_rejected_and_not_saved(isolated, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda url, timeout: b"<html>rate limited</html>")
    with pytest.raises(DataError, match="corrupt"):
        load_corpus("shakespeare")
    assert not (isolated / "cache" / "glasslstm" / "tinyshakespeare" / "input.txt").exists()


# --------------------------------------------------------------------------- tokenizers


def test_byte_level_round_trips_arbitrary_bytes():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=5000, dtype=np.uint8).tobytes()
    tok = build_tokenizer("byte", _corpus(raw))
    ids = tok.encode_bytes(raw)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 256 == tok.vocab_size
    assert bytes(ids.astype(np.uint8)) == raw
    text = "héllo wörld ☃\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # never fails
    assert tok.token_str(32) == "␣" and tok.token_str(10) == "\\n" and tok.token_str(65) == "A"


def test_char_vocabulary_is_the_training_splits_and_the_rest_is_unknown():
    c = _corpus("abc abc abc abc abc\nplus é and ☃ only in val: zq")
    assert "z" in c.val.decode() and "z" not in c.train.decode()
    tok = build_tokenizer("char", c)
    assert tok.level == "char" and tok.chars == sorted(set(c.train.decode()))
    assert tok.vocab_size == len(tok.chars) + 1 and tok.token_str(0) == "<unk>"
    ids = tok.encode_bytes(c.train)
    assert ids.dtype == np.int64 and 0 not in ids and tok.decode(ids) == c.train.decode()
    val = c.val.decode()
    unseen = [ch for ch in val if ch not in tok.chars]
    assert unseen and tok.unknown(val) == len(unseen)
    val_ids = tok.encode_bytes(c.val)
    assert list(val_ids).count(0) == len(unseen)  # each unseen character is the unknown symbol
    assert tok.decode(val_ids) == "".join("\ufffd" if ch in unseen else ch for ch in val)
    assert tok.encode("zab") == [0, *tok.encode("ab")]  # a prompt with any character works
    assert tok.decode(torch.tensor(tok.encode("cab\n"))) == "cab\n"
    assert tok.token_str(tok.encode(" ")[0]) == "␣" and tok.token_str(tok.encode("\n")[0]) == "\\n"


def test_word_level_follows_the_ptb_wikitext_conventions():
    train = " = Valkyria = \n\n Bob is a nice <unk> . Dan is evil .\nBob   is\ta <unk>\n"
    c = Corpus("w", train.encode(), b"Bob is nice\nDan is a Rare person .", "test")
    tok = build_tokenizer("word", c, min_freq=1)
    assert tok.tokens[:2] == ["<unk>", "<eos>"]
    assert "<" not in tok.stoi and "unk" not in tok.stoi  # <unk> is one token, the unknown one
    assert not any(t.isspace() for t in tok.tokens)  # no whitespace tokens
    ids = tok.encode_bytes(c.train)
    words = [tok.tokens[i] for i in ids]
    expected = "= Valkyria = <eos> <eos> Bob is a nice <unk> . Dan is evil . <eos> "
    assert words == (expected + "Bob is a <unk> <eos>").split()
    # the last line of a split ends in <eos> with or without a newline; unseen words are <unk>
    val = [tok.tokens[i] for i in tok.encode_bytes(c.val)]
    assert val == "Bob is nice <eos> Dan is a <unk> <unk> . <eos>".split()
    assert tok.unknown(c.val.decode()) == 2  # Rare, person (not the literal <unk>s)
    assert tok.unknown("a <unk> b") == 1
    # decoded with one space between words and a newline per <eos>
    assert tok.decode(tok.encode("Bob is evil .\nDan is nice")) == "Bob is evil .\nDan is nice"
    assert tok.decode(tok.encode("  Bob  is\n\n Dan ")) == "Bob is\n\nDan"
    # a prompt's continuation: a space before the first word unless the prompt ends in one
    for after, first in (("Bob is", " evil"), ("Bob is ", "evil"), ("", "evil"), ("x\n", "evil")):
        dec = tok.decoder(after=after)
        assert dec(tok.stoi["evil"]) + dec(tok.stoi["."]) + dec(1) + dec(tok.stoi["Dan"]) == (
            first + " .\nDan"
        )
    rare = build_tokenizer("word", c, min_freq=2)
    assert "Valkyria" not in rare.stoi and "Bob" in rare.stoi
    assert rare.vocab_size < tok.vocab_size


def test_tokenizers_of_earlier_runs_still_load_and_behave_as_before():
    """vocab.json as glasslstm wrote it before format 2: char without an unknown symbol,
    word split by a regex into words, punctuation and whitespace runs."""
    char = tokenizer_from_dict(
        {"format_version": 1, "level": "char", "vocab_size": 4, "chars": [" ", "a", "b", "c"]}
    )
    assert char.vocab_size == 4 and char.encode("cab a") == [3, 1, 2, 0, 1]
    assert char.decode([3, 1, 2]) == "cab" and char.unknown("abz!") == 2
    with pytest.raises(DataError, match=r"'z'.*train again"):
        char.encode("abz")
    with pytest.raises(DataError, match=r"'!'"):
        char.encode_bytes(b"ab!", what="the file")
    tokens = ["<unk>", " ", "Bob", "is", ".", "\n\n"]
    word = tokenizer_from_dict(
        {"format_version": 1, "level": "word", "vocab_size": 6, "tokens": tokens}
    )
    assert word.split == "regex"
    assert word.encode("Bob is.\n\nBob") == [2, 1, 3, 4, 5, 2]
    assert word.decode(word.encode("Bob is Dan.")) == "Bob is <unk>."
    assert word.to_dict()["format_version"] == data.FORMAT_VERSION and "split" not in word.to_dict()


@pytest.mark.parametrize("level", data.LEVELS)
def test_tokenizer_dict_round_trip_through_json(level):
    c = load_corpus("stories")
    c = Corpus("s", c.train[:20000], c.val[:3000], "test")
    tok = build_tokenizer(level, c)
    d = json.loads(json.dumps(tok.to_dict()))
    assert d["level"] == level and d["format_version"] == data.FORMAT_VERSION
    back = tokenizer_from_dict(d)
    assert back == tok and type(back) is type(tok) and back.vocab_size == tok.vocab_size
    ids = tok.encode_bytes(c.val)
    assert np.array_equal(back.encode_bytes(c.val), ids)
    assert back.decode(ids) == tok.decode(ids)


def test_tokenizer_from_dict_rejects_bad_input():
    with pytest.raises(DataError, match="unknown level"):
        tokenizer_from_dict({"format_version": 1, "level": "bpe"})
    with pytest.raises(DataError, match="newer"):
        tokenizer_from_dict({"format_version": data.FORMAT_VERSION + 1, "level": "byte"})
    with pytest.raises(DataError, match="malformed"):
        tokenizer_from_dict({"format_version": 1, "level": "char"})
    with pytest.raises(DataError, match="vocab_size"):
        tokenizer_from_dict({"format_version": 1, "level": "char", "chars": ["a"], "vocab_size": 2})
    with pytest.raises(DataError, match="split"):
        tokenizer_from_dict({"format_version": 2, "level": "word", "tokens": ["<unk>", "<eos>"]})
    with pytest.raises(DataError, match="<eos>"):
        tokenizer_from_dict(
            {"format_version": 2, "level": "word", "tokens": ["<unk>"], "split": "whitespace"}
        )
    with pytest.raises(DataError, match="unk"):
        tokenizer_from_dict({"format_version": 2, "level": "char", "chars": ["a"], "unk": "yes"})
    with pytest.raises(DataError, match="unknown level"):
        build_tokenizer("sentencepiece", _corpus("abc"))


# --------------------------------------------------------------------------- batching


def test_token_stream_rows_continue_across_batches():
    ids = np.arange(1000, dtype=np.int64)
    B, T = 4, 7
    s = TokenStream(ids, B, T)
    N = 1000 // B
    assert s.num_batches == len(s) == (N - 1) // T
    for k in range(s.num_batches - 1):
        x, y = s.batch(k)
        x2, _ = s.batch(k + 1)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
        assert torch.equal(x2[:, 0], x[:, -1] + 1)  # row b continues where it ended
        assert torch.equal(y[:, -1], x2[:, 0])
        assert torch.equal(x[:, 0], torch.arange(B) * N + k * T)  # contiguous rows (B, N)
    assert torch.equal(s.batch(s.num_batches)[0], s.batch(0)[0])  # k mod num_batches
    assert torch.equal(TokenStream(torch.from_numpy(ids), B, T).batch(3)[1], s.batch(3)[1])


def test_token_stream_too_short_says_what_is_needed():
    TokenStream(np.arange(4 * 8), 4, 7)  # exactly one batch fits
    with pytest.raises(DataError) as e:
        TokenStream(np.arange(31), 4, 7, what="the validation split")
    msg = str(e.value)
    assert "the validation split has 31 tokens" in msg and "need 32" in msg
    assert "--batch-size" in msg and "--seq-len" in msg


def test_random_batch_windows_are_deterministic_and_shifted():
    ids = np.arange(1000, dtype=np.int64)
    stream = TokenStream(ids, batch_size=4, seq_len=16)
    x, y = stream.random_batch(7)
    x2, y2 = stream.random_batch(7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.long))  # contiguous
    assert not torch.equal(stream.random_batch(8)[0], x)

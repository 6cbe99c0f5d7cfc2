"""Corpora, tokenizers and TBPTT batching (glasslstm.data)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from glasslstm import data
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


def test_char_level_round_trip_and_vocab_covers_val():
    c = _corpus("abc abc abc abc abc\nplus é and ☃ only in val: zq")
    assert "z" in c.val.decode()
    tok = build_tokenizer("char", c)
    assert tok.level == "char" and tok.chars == sorted(set((c.train + c.val).decode()))
    for split in (c.train, c.val):
        ids = tok.encode_bytes(split)
        assert ids.dtype == np.int64 and tok.decode(ids) == split.decode()
    assert tok.decode(torch.tensor(tok.encode("cab\n"))) == "cab\n"
    assert tok.token_str(tok.encode(" ")[0]) == "␣" and tok.token_str(tok.encode("\n")[0]) == "\\n"


def test_char_level_unknown_prompt_characters_are_named():
    tok = build_tokenizer("char", _corpus("hello world, hello there\n"))
    with pytest.raises(DataError) as e:
        tok.encode("hello XYZ!")
    msg = str(e.value)
    assert "'X'" in msg and "'Y'" in msg and "'!'" in msg and "'h'" not in msg
    assert f"vocabulary of {tok.vocab_size} characters" in msg
    with pytest.raises(DataError, match="'Q'"):
        tok.encode_bytes(b"hello Q", what="the prompt file")


def test_word_level_round_trip_and_unk():
    text = "Bob is a nice person. Dan, on the other hand, is evil.\n\n" * 3 + "Rare word here.\n"
    c = Corpus("w", text.encode(), b"Bob is evil.\n\n", "test")
    tok = build_tokenizer("word", c, min_freq=2)
    assert tok.tokens[0] == "<unk>" and "Bob" in tok.stoi and "Rare" not in tok.stoi
    known = "Dan is a nice person.\n\nBob, on the other hand, is evil."
    assert tok.decode(tok.encode(known)) == known
    ids = tok.encode("Bob is a Rare person.")
    assert ids.count(0) == 1 and tok.decode(ids) == "Bob is a <unk> person."
    assert tok.decode(tok.encode_bytes(c.val)) == "Bob is evil.\n\n"
    assert tok.token_str(tok.stoi["\n\n"]) == "\\n\\n"
    assert build_tokenizer("word", c, min_freq=1).vocab_size > tok.vocab_size


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

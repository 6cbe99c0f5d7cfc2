"""Corpora, tokenizers (char / word / byte) and batching for truncated BPTT.

Data flows: ``load_corpus(spec) -> Corpus`` (raw bytes: the train, validation and, where
given, test splits; one text is split 90/10) ->
``build_tokenizer(level, corpus) -> Tokenizer`` (saved with the model as ``vocab.json`` via
``to_dict``) -> ``encode_corpus`` -> ``TokenStream(ids, batch_size, seq_len)`` -> ``batch(k)``.

Every problem with the user's data is a :class:`DataError` whose message names the problem
and the fix; the CLI prints it without a traceback.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import stories
from .errors import DataError
from .options import LEVELS, NAMED_CORPORA
from .rundir import atomic_write_bytes

__all__ = [
    "LEVELS",
    "NAMED_CORPORA",
    "Corpus",
    "DataError",
    "Tokenizer",
    "CharTokenizer",
    "WordTokenizer",
    "ByteTokenizer",
    "TokenStream",
    "build_tokenizer",
    "cache_dir",
    "encode_corpus",
    "find_split_files",
    "load_corpus",
    "split_bytes",
    "tokenizer_from_dict",
]

TRAIN_FRACTION = 0.9  # nanoGPT's split: first 90% train, last 10% validation
# Of the tokenizer dict (vocab.json); bump on incompatible changes. 2: char level reserves an
# unknown symbol, word level splits lines at whitespace with an end-of-line token. Version 1
# dicts still load, with version 1's behaviour.
FORMAT_VERSION = 2
SPLITS = ("train", "valid", "test")
# The words that name a split in a file name (wiki.train.tokens, ptb.valid.txt, dev.txt).
SPLIT_WORDS = {
    "train": ("train",),
    "valid": ("valid", "validation", "val", "dev"),
    "test": ("test",),
}

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_NAMES = ("tinyshakespeare/input.txt", "tinyshakespeare.txt", "shakespeare.txt")
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Corpus:
    """Raw text of a corpus, already split into training, validation and (optional) test."""

    name: str  # "stories", "shakespeare", or the path
    train: bytes  # raw bytes of the training split
    val: bytes  # raw bytes of the validation split
    source: str  # human description: where it came from
    test: bytes = b""  # raw bytes of the test split (empty: none)
    files: dict[str, str] = field(default_factory=dict)  # split -> the file it was read from


# --------------------------------------------------------------------------- corpora


def split_bytes(data: bytes, fraction: float = TRAIN_FRACTION) -> tuple[bytes, bytes]:
    """``(data[:cut], data[cut:])`` with ``cut = int(len * fraction)`` moved back (at most 3
    bytes) so that it does not fall inside a UTF-8 multibyte sequence."""
    cut = int(len(data) * fraction)
    for _ in range(3):  # a UTF-8 character has at most 3 continuation bytes (0b10xxxxxx)
        if 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
            cut -= 1
    return data[:cut], data[cut:]


def load_corpus(
    spec: str | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    train: str | os.PathLike | None = None,
    valid: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
) -> Corpus:
    """Load a corpus by name, path or split files.

    ``spec``: ``None`` or ``"stories"`` (the built-in generated stories, deterministic in
    ``seed``), ``"shakespeare"`` (tiny-shakespeare: looked up in ``data_dir``, then
    ``$GLASSLSTM_DATA``, then the cache dir, downloaded into the cache if absent), a path to
    a UTF-8 text file, or a folder. A folder that holds split files (``train.txt``,
    ``valid.txt``, ``test.txt``, ``wiki.train.tokens``, ...: :func:`find_split_files`) is
    read as those splits; any other folder's ``.txt`` files are joined (sorted by name, a
    blank line between). One text is split 90/10 into training and validation. The names
    win over a file of the same name: write ``./stories`` for the file.

    ``train``, ``valid``, ``test`` (instead of ``spec``): the splits' files. Without
    ``valid`` the last 10% of ``train`` is the validation split; without ``test`` there is
    none.
    """
    if train is not None or valid is not None or test is not None:
        if spec is not None:
            raise DataError(
                "--data and --train/--valid/--test both name the text; give either --data "
                "(a file or folder) or the split files"
            )
        if train is None:
            raise DataError("--valid and --test need --train FILE (the training split)")
        named = {"train": train, "valid": valid, "test": test}
        return _split_files_corpus(
            str(train), {k: Path(v).expanduser() for k, v in named.items() if v is not None}
        )
    if spec is None or spec == "stories":
        text = stories.generate_stories(seed).encode("ascii")
        tr, val = split_bytes(text)
        return Corpus(
            "stories",
            tr,
            val,
            f"generated by glasslstm.stories (seed {seed}, {stories.DEFAULT_STORIES} stories)",
        )
    if spec == "shakespeare":
        data, source = _shakespeare(data_dir)
        tr, val = split_bytes(data)
        return Corpus("shakespeare", tr, val, source)
    path = Path(spec).expanduser()
    if path.is_dir():
        splits = find_split_files(path)
        if splits:
            return _split_files_corpus(str(spec), splits)
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise DataError(
                f"folder {str(path)!r} has no .txt files; put the training text in "
                "one or more UTF-8 .txt files there (or train.txt, valid.txt and test.txt), "
                "or pass a file instead"
            )
        parts = [_read(p) for p in files]
        # One blank line between files: each part ends in exactly one more "\n" than needed.
        data = b"\n".join(p if p.endswith(b"\n") else p + b"\n" for p in parts)
        source = f"{len(files)} .txt files in {path.resolve()}"
    elif path.is_file():
        data = _read(path)
        source = f"file {path.resolve()}"
    else:
        raise DataError(
            f"{spec!r} is neither a named corpus ({', '.join(NAMED_CORPORA)}) nor an "
            "existing file or folder; pass one of the names, a UTF-8 text file, or "
            "a folder of .txt files"
        )
    if not data.strip():
        raise DataError(f"{spec!r} is empty or only whitespace; give it some text to learn from")
    tr, val = split_bytes(data)
    return Corpus(str(spec), tr, val, source)


def _split_role(name: str) -> list[str]:
    """The splits a file name names: ``wiki.valid.tokens`` -> ["valid"]."""
    words = set(re.split(r"[._\-\s]+", name.lower()))
    return [role for role, names in SPLIT_WORDS.items() if words & set(names)]


def find_split_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The split files in ``folder``, ``{"train": path, "valid": path, "test": path}``: the
    regular, non-hidden files whose name has ``train``, ``valid`` (or ``validation``,
    ``val``, ``dev``) or ``test`` as a word (``train.txt``, ``wiki.train.tokens``,
    ``ptb.valid.txt``). Empty when there are none. A DataError naming the files when the
    layout is ambiguous (two files for one split, one file naming two) or incomplete (no
    training file; validation or test alone is not a layout)."""
    folder = Path(folder)
    found: dict[str, list[Path]] = {role: [] for role in SPLITS}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        roles = _split_role(p.name)
        if len(roles) > 1:
            raise DataError(
                f"folder {str(folder)!r}: {p.name!r} names more than one split "
                f"({', '.join(roles)}); rename it, or name the files with --train FILE "
                "--valid FILE --test FILE"
            )
        if roles:
            found[roles[0]].append(p)
    if not any(found.values()):
        return {}
    for role, paths in found.items():
        if len(paths) > 1:
            raise DataError(
                f"folder {str(folder)!r} is ambiguous: {len(paths)} files for the {role} split "
                f"({', '.join(p.name for p in paths)}); keep one, or name the files with "
                "--train FILE --valid FILE --test FILE"
            )
    if not found["train"]:
        have = ", ".join(p.name for paths in found.values() for p in paths)
        raise DataError(
            f"folder {str(folder)!r} has {have} but no training file (train.txt, or a name "
            "with 'train' in it); add one, or name the files with --train FILE --valid FILE "
            "--test FILE"
        )
    return {role: paths[0] for role, paths in found.items() if paths}


def _split_files_corpus(name: str, paths: dict[str, Path]) -> Corpus:
    """A corpus whose splits are files: each read as it is, never joined with another."""
    texts = {}
    for role, path in paths.items():
        if not path.is_file():
            raise DataError(
                f"the {role} file {str(path)!r} does not exist (or is not a file); "
                f"pass an existing UTF-8 text file as --{role}"
            )
        texts[role] = _read(path)
        if not texts[role].strip():
            raise DataError(
                f"the {role} file {str(path)!r} is empty or only whitespace; give it some text"
            )
    files = {role: str(path.resolve()) for role, path in paths.items()}
    if "valid" in texts:
        tr, val = texts["train"], texts["valid"]
        source = f"split files: train {files['train']}, valid {files['valid']}"
    else:
        tr, val = split_bytes(texts["train"])
        source = f"split files: train {files['train']} (its last 10% for validation)"
    if "test" in files:
        source += f", test {files['test']}"
    return Corpus(name, tr, val, source, test=texts.get("test", b""), files=files)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r}: {e.strerror or e}") from e


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/glasslstm``, or ``~/.cache/glasslstm`` where that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glasslstm"


def _search_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    dirs = [Path(data_dir).expanduser()] if data_dir is not None else []
    if os.environ.get("GLASSLSTM_DATA"):
        dirs.append(Path(os.environ["GLASSLSTM_DATA"]).expanduser())
    dirs.append(cache_dir())
    return dirs


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(url: str, timeout: float) -> bytes:
    """GET ``url`` (tests replace this function; they never touch the network)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (fixed https URL)
        return r.read()


def _shakespeare(data_dir: str | os.PathLike | None) -> tuple[bytes, str]:
    searched = [d / name for d in _search_dirs(data_dir) for name in SHAKESPEARE_NAMES]
    for path in searched:
        if path.is_file():
            data = _read(path)
            got = _sha256(data)
            if got != SHAKESPEARE_SHA256:
                raise DataError(
                    f"{path} is not tiny-shakespeare: its sha256 is {got}, expected "
                    f"{SHAKESPEARE_SHA256}. Delete it (it will be downloaded again) or replace it "
                    f"with the file from {SHAKESPEARE_URL}"
                )
            return data, f"tiny-shakespeare from {path} (sha256 verified)"

    target = cache_dir() / SHAKESPEARE_NAMES[0]
    where = "\n  ".join(str(p) for p in searched)
    try:
        data = _download(SHAKESPEARE_URL, DOWNLOAD_TIMEOUT_S)
    except Exception as e:  # any network failure (URLError, timeout, HTTP error) -> same advice
        raise DataError(
            f"tiny-shakespeare is not on this machine and downloading it from {SHAKESPEARE_URL} "
            f"failed ({e}).\nLooked for it at:\n  {where}\nDownload that file yourself and put it "
            f"at one of these paths (e.g. {target}), or put it in a folder DIR as "
            "DIR/tinyshakespeare/input.txt and pass --data-dir DIR or set GLASSLSTM_DATA=DIR"
        ) from e
    got = _sha256(data)
    if got != SHAKESPEARE_SHA256:
        raise DataError(
            f"the download from {SHAKESPEARE_URL} is corrupt: sha256 {got}, expected "
            f"{SHAKESPEARE_SHA256}; try again, or put the file at {target} yourself"
        )
    try:
        atomic_write_bytes(target, data)
    except OSError as e:  # a read-only cache must not stop training: it is just slower next time
        warnings.warn(
            f"could not save tiny-shakespeare to {target} ({e}); it will be downloaded "
            "again next time",
            RuntimeWarning,
            stacklevel=3,
        )
        return data, f"tiny-shakespeare downloaded from {SHAKESPEARE_URL} (not saved)"
    return data, f"tiny-shakespeare downloaded from {SHAKESPEARE_URL} to {target}"


# --------------------------------------------------------------------------- tokenizers


def _decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 4].hex(" ")
        raise DataError(
            f"{what} is not valid UTF-8: at byte offset {e.start} ({e.reason}; bytes {bad}). "
            "Use --level byte to train on raw bytes (any file works), or re-encode the file as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _printable(s: str) -> str:
    """One token as a short printable string: space -> '␣', control chars escaped."""
    return "".join(
        "␣" if c == " " else c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in s
    )


def _ids_list(ids: Iterable[int] | np.ndarray | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


class Tokenizer:
    """Maps text to token ids and back. Subclasses: char, word, byte.

    ``encode(text) -> list[int]`` for prompts; ``encode_bytes(data, what=) -> np.ndarray``
    (int64, 1-D) for a whole corpus split; ``decode(ids) -> str``; ``decoder(after)`` decodes
    one id at a time (generation); ``unknown(text)``: how many of the text's characters
    (words, at word level) are outside the vocabulary; ``to_dict()`` is JSON-able
    (``vocab.json``) and ``tokenizer_from_dict`` reads it back; ``token_str(id)`` is one token
    in printable form (space as '␣', newline as '\\n').
    """

    level: str
    vocab_size: int
    unit = "character"  # what unknown() counts

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_bytes(self, data: bytes, *, what: str = "text") -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids) -> str:
        dec = self.decoder()
        return "".join(dec(i) for i in _ids_list(ids)) + dec.flush()

    def decoder(self, after: str = "") -> PieceDecoder:
        """Text of one id at a time, for a stream of generated tokens that continues
        ``after`` (the prompt): ``dec(id) -> str``, then ``dec.flush()`` at the end."""
        return PieceDecoder(self._piece)

    def _piece(self, id: int) -> str:
        raise NotImplementedError

    def token_str(self, id: int) -> str:
        raise NotImplementedError

    def unknown(self, text: str) -> int:
        """How many characters (words, at word level) of ``text`` have no token of their
        own and are read as the unknown symbol."""
        return 0

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "level": self.level,
            "vocab_size": self.vocab_size,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    def _check_id(self, i: int) -> None:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")


class PieceDecoder:
    """Decodes a stream of token ids one at a time: ``piece(id)`` maps one id to its text."""

    def __init__(self, piece: Callable[[int], str]):
        self.piece = piece

    def __call__(self, id: int) -> str:
        return self.piece(id)

    def flush(self) -> str:
        """What is still held back at the end of the stream (a partial UTF-8 character)."""
        return ""


class _ListTokenizer(Tokenizer):
    """A vocabulary that is a list of strings (``self.items``): token id i is items[i]."""

    items: list[str]

    def _piece(self, id: int) -> str:
        self._check_id(id)
        return self.items[id]

    def token_str(self, id: int) -> str:
        self._check_id(id)
        return _printable(self.items[id])


class CharTokenizer(_ListTokenizer):
    """One token per Unicode character of the training text (sorted).

    With ``unk`` (every vocabulary built since format 2), id 0 is the unknown symbol: a
    character the training text did not have is read as it (and decoded as U+FFFD), so any
    text can be evaluated or inspected; ``chars[i]`` is then id ``i + 1``. Without it (runs
    saved before), an unknown character is an error naming it.
    """

    level = "char"
    UNK = "<unk>"  # how the unknown symbol is shown (token_str)
    UNK_TEXT = "\ufffd"  # what it decodes to: Unicode's replacement character

    def __init__(self, chars: Iterable[str], *, unk: bool = False):
        self.chars = list(chars)
        self.unk = unk
        self.offset = 1 if unk else 0
        self.items = ([self.UNK_TEXT] if unk else []) + self.chars
        self.vocab_size = len(self.items)
        self.stoi = {c: i + self.offset for i, c in enumerate(self.chars)}
        # Sorted code points -> vectorised lookup of a whole corpus with searchsorted.
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._order = np.argsort(codes) + self.offset
        self._codes = codes[np.argsort(codes)]

    def _unknown(self, unknown: Iterable[str], what: str) -> DataError:
        shown = ", ".join(repr(c) for c in sorted(set(unknown))[:20])
        return DataError(
            f"{what} has characters that are not in the vocabulary: {shown}. The model was trained "
            f"on a vocabulary of {self.vocab_size} characters (saved by an earlier glasslstm, "
            "without an unknown symbol); remove these characters, or train again (a new run "
            "reads unknown characters as its unknown symbol), or use --level byte"
        )

    def encode(self, text: str) -> list[int]:
        if self.unk:
            get = self.stoi.get
            return [get(c, 0) for c in text]
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            raise self._unknown((c for c in text if c not in self.stoi), "the prompt") from None

    def _lookup(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, unknown)``: each character's id, and which are not in the vocabulary."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        if not len(self._codes):
            return np.zeros_like(codes), np.ones(codes.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        bad = self._codes[pos] != codes
        return np.where(bad, 0, self._order[pos]).astype(np.int64), bad

    def encode_bytes(self, data: bytes, *, what: str = "text") -> np.ndarray:
        text = _decode_utf8(data, what)
        ids, bad = self._lookup(text)
        if bad.any() and not self.unk:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)[bad]
            raise self._unknown((chr(c) for c in np.unique(codes)), what)
        return ids

    def unknown(self, text: str) -> int:
        return int(self._lookup(text)[1].sum())

    def token_str(self, id: int) -> str:
        if self.unk and id == 0:
            return self.UNK
        return super().token_str(id)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "chars": self.chars, "unk": self.unk}


class WordTokenizer(_ListTokenizer):
    r"""Words as in the PTB and WikiText literature (pytorch/examples' word_language_model).

    ``split="whitespace"`` (every vocabulary built since format 2): each line is split at
    whitespace and ends in ``<eos>``; a literal ``<unk>`` in the text is the unknown token
    (id 0), as are words outside the vocabulary. Decoding puts one space between words and
    a newline for each ``<eos>``. ``split="words"`` (the built-in stories, which are prose
    rather than a pre-tokenized corpus): the same, with each punctuation mark a token of its
    own, so "Bob." is "Bob" and "."; decoding puts no space before closing punctuation.
    ``split="regex"`` (runs saved before): words, single punctuation marks and whitespace
    runs, each a token (``\w+|[^\w\s]|\s+``).
    """

    level = "word"
    unit = "word"
    UNK = "<unk>"
    EOS = "<eos>"
    SPLITS = ("whitespace", "words", "regex")
    PATTERN = re.compile(r"\w+|[^\w\s]|\s+")
    WORD = re.compile(r"<unk>|<eos>|\w+(?:['’]\w+)*|[^\w\s]")  # split="words"
    CLOSING = set(".,;:!?)]}%'’")  # no space before these when decoding split="words"
    OPENING = set("([{")  # nor after these

    def __init__(self, tokens: Iterable[str], *, split: str = "whitespace"):
        self.tokens = self.items = list(tokens)
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {', '.join(self.SPLITS)}; got {split!r}")
        if not self.tokens or self.tokens[0] != self.UNK:
            raise ValueError(f"the first token must be {self.UNK!r}")
        if split != "regex" and self.EOS not in self.tokens:
            raise ValueError(f"a whitespace-split vocabulary needs {self.EOS!r}")
        self.split = split
        self.vocab_size = len(self.tokens)
        self.stoi = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def words(cls, text: str, *, split: str = "whitespace") -> list[str]:
        """The tokens of ``text``: whitespace-separated words with ``<eos>`` for each
        newline (``split="whitespace"``), or the regex's matches."""
        if split == "regex":
            return cls.PATTERN.findall(text)
        lines = text.split("\n")
        out: list[str] = []
        for k, line in enumerate(lines):
            out.extend(line.split() if split == "whitespace" else cls.WORD.findall(line))
            if k < len(lines) - 1:
                out.append(cls.EOS)
        return out

    @classmethod
    def fit(cls, text: str, min_freq: int = 2, *, split: str = "whitespace") -> WordTokenizer:
        counts = Counter(cls.words(_as_lines(text) if split != "regex" else text, split=split))
        counts.pop(cls.UNK, None)
        special = [cls.UNK] + ([cls.EOS] if split != "regex" else [])
        counts.pop(cls.EOS, None)
        kept = sorted(
            (t for t, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t)
        )
        return cls([*special, *kept], split=split)

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(t, 0) for t in self.words(text, split=self.split)]

    def encode_bytes(self, data: bytes, *, what: str = "text") -> np.ndarray:
        text = _decode_utf8(data, what)
        if self.split != "regex":
            text = _as_lines(text)  # a file's last line ends in <eos>, newline or not
        return np.array(self.encode(text), dtype=np.int64)

    def unknown(self, text: str) -> int:
        return sum(
            1 for t in self.words(text, split=self.split) if t not in self.stoi and t != self.UNK
        )

    def decoder(self, after: str = "") -> PieceDecoder:
        if self.split == "regex":
            return super().decoder(after)
        line_start = not after or after[-1].isspace()
        glue = self.split == "words"  # punctuation attaches to its word
        if glue and after and after[-1] in self.OPENING:
            line_start = True

        def piece(id: int) -> str:
            nonlocal line_start
            self._check_id(id)
            word = self.tokens[id]
            if word == self.EOS:
                line_start = True
                return "\n"
            attach = line_start or (glue and word in self.CLOSING)
            text = word if attach else " " + word
            line_start = glue and word in self.OPENING
            return text

        return PieceDecoder(piece)

    def to_dict(self) -> dict:
        extra = {"split": self.split} if self.split != "regex" else {}
        return {**super().to_dict(), "tokens": self.tokens, **extra}


def _as_lines(text: str) -> str:
    """``text`` ending in a newline (a file's last line is a line, with or without one)."""
    return text if not text or text.endswith("\n") else text + "\n"


class ByteTokenizer(Tokenizer):
    """One token per byte (256 ids): accepts any input; decodes UTF-8 with replacement."""

    level = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def encode_bytes(self, data: bytes, *, what: str = "text") -> np.ndarray:
        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        ids = _ids_list(ids)
        for i in ids:
            self._check_id(i)
        return bytes(ids).decode("utf-8", errors="replace")

    def decoder(self, after: str = "") -> PieceDecoder:
        return _ByteDecoder(self)

    def token_str(self, id: int) -> str:
        self._check_id(id)
        if id == 0x20:
            return "␣"
        if 0x20 < id < 0x7F:
            return chr(id)
        return {9: "\\t", 10: "\\n", 13: "\\r"}.get(id, f"\\x{id:02x}")


class _ByteDecoder(PieceDecoder):
    """Bytes to text as they come: a UTF-8 character split across tokens waits for its end."""

    def __init__(self, tok: ByteTokenizer):
        self.tok = tok
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        super().__init__(self._piece)

    def _piece(self, id: int) -> str:
        self.tok._check_id(id)
        return self.utf8.decode(bytes([id]))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def build_tokenizer(level: str, corpus: Corpus, *, min_freq: int = 2) -> Tokenizer:
    """Fit a tokenizer on the training split of ``corpus`` (the validation and test splits
    are read with it as they are: what they have that training had not is unknown).

    char: the sorted set of the training text's characters, plus the unknown symbol (id 0);
    word: words seen at least ``min_freq`` times in training, plus ``<unk>`` and ``<eos>``;
    byte: fixed 256. Char and word levels need UTF-8: invalid bytes raise
    :class:`DataError` with the offset.
    """
    if level == "byte":
        return ByteTokenizer()
    if level not in LEVELS:
        raise DataError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    if min_freq < 1:
        raise ValueError(f"min_freq must be at least 1, got {min_freq}")
    text = _decode_utf8(corpus.train, f"the training split of {corpus.name!r}")
    # fail early on the other splits too, with their own offsets
    _decode_utf8(corpus.val, f"the validation split of {corpus.name!r}")
    _decode_utf8(corpus.test, f"the test split of {corpus.name!r}")
    if level == "char":
        return CharTokenizer(sorted(set(text)), unk=True)
    # The built-in stories are prose, not a pre-tokenized corpus: their punctuation is split
    # off ("Bob." is "Bob" and "."), so a name is one token wherever it stands.
    split = "words" if corpus.name == "stories" else "whitespace"
    return WordTokenizer.fit(text, min_freq, split=split)


def encode_corpus(tok: Tokenizer, corpus: Corpus) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, val_ids)``: each split encoded with ``tok`` (int64, 1-D)."""
    return (
        tok.encode_bytes(corpus.train, what=f"the training split of {corpus.name!r}"),
        tok.encode_bytes(corpus.val, what=_val_what(corpus)),
    )


def _val_what(corpus: Corpus) -> str:
    if "valid" in corpus.files:
        return f"the validation file {corpus.files['valid']!r}"
    return f"the validation split of {corpus.name!r} (which starts at byte {len(corpus.train)})"


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_dict` output (e.g. a run's vocab.json)."""
    if not isinstance(d, dict):
        raise DataError(f"a vocabulary must be a JSON object, got {type(d).__name__}")
    version = d.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise DataError(f"vocabulary has no valid format_version (got {version!r})")
    if version > FORMAT_VERSION:
        raise DataError(
            f"vocabulary format_version {version} is newer than this glasslstm reads "
            f"({FORMAT_VERSION}); upgrade glasslstm"
        )
    level = d.get("level")
    try:
        if level == "byte":
            tok: Tokenizer = ByteTokenizer()
        elif level == "char":
            chars = d["chars"]
            if (
                not isinstance(chars, list)
                or not all(isinstance(c, str) and len(c) == 1 for c in chars)
                or len(set(chars)) != len(chars)
            ):
                raise DataError("vocabulary 'chars' must be distinct single characters")
            unk = d["unk"] if version >= 2 else False  # format 1 had no unknown symbol
            if not isinstance(unk, bool):
                raise DataError(f"vocabulary 'unk' must be true or false, got {unk!r}")
            tok = CharTokenizer(chars, unk=unk)
        elif level == "word":
            tokens = d["tokens"]
            if (
                not isinstance(tokens, list)
                or not all(isinstance(t, str) and t for t in tokens)
                or len(set(tokens)) != len(tokens)
            ):
                raise DataError("vocabulary 'tokens' must be distinct non-empty strings")
            split = d["split"] if version >= 2 else "regex"  # format 1 split with a regex
            if split not in WordTokenizer.SPLITS:
                raise DataError(
                    f"vocabulary 'split' must be one of {', '.join(WordTokenizer.SPLITS)}, "
                    f"got {split!r}"
                )
            tok = WordTokenizer(tokens, split=split)
        else:
            raise DataError(f"vocabulary has unknown level {level!r}; known: {', '.join(LEVELS)}")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"vocabulary of level {level!r} is malformed: {e!r}") from e
    if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
        raise DataError(
            f"vocabulary says vocab_size {d['vocab_size']} but lists {tok.vocab_size} tokens"
        )
    return tok


# --------------------------------------------------------------------------- batching


class TokenStream:
    """Batches of a 1-D token stream for truncated BPTT, with the LSTM state carried across.

    The ids are cut into ``batch_size`` contiguous rows, ``(B, N)`` (like pytorch/examples'
    ``batchify``; the remainder is dropped), and batch ``k`` is columns ``[kT, (k+1)T)``:
    row ``b`` of batch ``k+1`` continues exactly where row ``b`` of batch ``k`` ended, so the
    final state of one batch is the right initial state of the next. ``y`` is ``x`` shifted
    by one token. ``batch(k)`` is random access (``k`` mod ``num_batches``), for exact resume.
    """

    def __init__(
        self,
        ids: np.ndarray | torch.Tensor,
        batch_size: int,
        seq_len: int,
        *,
        what: str = "the training split",
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        # A private int64 copy: the caller's array may be read-only (np.frombuffer) or reused.
        ids = (
            ids.detach().to("cpu", torch.long).clone()
            if isinstance(ids, torch.Tensor)
            else torch.from_numpy(np.array(ids, dtype=np.int64))
        )
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        n, need = ids.numel(), batch_size * (seq_len + 1)
        if n < need:
            raise DataError(
                f"{what} has {n} tokens, too few for one batch: --batch-size {batch_size} rows of "
                f"--seq-len {seq_len} (+1 for the targets) need {need}. Lower --batch-size or "
                "--seq-len, or use more text"
            )
        self.batch_size, self.seq_len = batch_size, seq_len
        cols = n // batch_size
        self.ids = ids  # (n,)
        self.rows = ids[: cols * batch_size].reshape(batch_size, cols)  # (B, N)
        self.num_batches = (cols - 1) // seq_len

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, each ``(B, seq_len)`` int64, batch_first; ``y[b, t]`` is the token that
        follows ``x[b, t]`` in the stream (so ``y[:, :-1] == x[:, 1:]``)."""
        start = (k % self.num_batches) * self.seq_len
        x = self.rows[:, start : start + self.seq_len].contiguous()
        y = self.rows[:, start + 1 : start + 1 + self.seq_len].contiguous()
        return x, y

    @property
    def columns(self) -> int:
        """Tokens in each row (the last one is only ever a target)."""
        return self.rows.shape[1]

    def window(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the columns ``[start, start + length)`` (fewer at the rows' end): the
        windows of variable length that ``--variable-bptt`` walks the rows with."""
        end = min(start + length, self.columns - 1)
        if not 0 <= start < end:
            raise ValueError(f"no window at column {start} of rows of {self.columns} tokens")
        x = self.rows[:, start:end].contiguous()
        y = self.rows[:, start + 1 : end + 1].contiguous()
        return x, y

    def random_batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``batch_size`` windows at random offsets of the whole stream (nanoGPT's
        sampling): independent rows, so no state is carried. Deterministic in ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(
            0, self.ids.numel() - self.seq_len, (self.batch_size,), generator=gen
        )
        idx = starts[:, None] + torch.arange(self.seq_len + 1)  # (B, T + 1)
        window = self.ids[idx]
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def __iter__(self):
        return (self.batch(k) for k in range(self.num_batches))

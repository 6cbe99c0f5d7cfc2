"""What the web inspector knows and computes, apart from HTTP: the model, its cached forward
pass (:mod:`glasslstm.inspection.prefix`), the match text, the opening example and the most
informative cells. Each route method takes a request's JSON body (a dict) and returns the
reply's; a bad field raises :class:`RequestError` with a message for the user.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glasslstm.data import load_corpus
from glasslstm.errors import ConfigError, DataError, GlassLSTMError
from glasslstm.inspection.analysis import analyze
from glasslstm.inspection.common import QUANTITIES
from glasslstm.inspection.prefix import PrefixCache
from glasslstm.inspection.spans import (
    cells_on,
    colour_scale,
    find_matches,
    informative_cells,
    pattern_cells,
)
from glasslstm.model import LanguageModel, training_data, training_splits

MAX_CHARS = 2000  # typed text: one forward pass per keystroke pause stays interactive
MATCH_CHARS = 20_000  # the match text is analysed once; h and c of every step stay in memory
CACHE_MB = 512  # the prefix cache: ~20 texts of 2,000 tokens for a 2 x 256 model
MAX_TOP_K = 50
HEAT_CELLS = 32  # heatmap rows the page opens with: the most informative cells of the layer
MAX_CELLS = 64  # cells one analysis sends: 2,000 tokens x 64 cells stay under 1 MB
PATTERN_CELLS = 5  # span matching: the selected span's most distinctive "on" cells ...
TOLERANCE = 1  # ... of which this many may be off at a step of a match
DISTINCTIVE = 0.5  # a pattern cell is on at fewer than half the tokens of the match text
SPAN_CHARS = 300  # a match's text shown: a longer one is cut in the middle
ON_QUANTITIES = ("h", "c")  # "on" means the state is high: LSTMVis thresholds h (c also works)
CONTEXT_CHARS = 40  # excerpt around a match, each side
EXAMPLE_CHARS = 600  # the opening excerpt of the match text, when that is the example

# The article's examples in one passage: a subject switch at a full stop ("Dan, on the other
# hand") and a blank whose answer was named long before ("For his contributions, brave ____").
ARTICLE_EXAMPLE = (
    "Bob can swim. He told me over the phone that he had served in the Navy for four long "
    "years. Bob fought the enemy alone and died for his country. Dan, on the other hand, is "
    "evil. For his contributions, brave "
)


class RequestError(Exception):
    """A bad request; ``message`` is shown to the user as it is."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class MatchText:
    """The analysed match text: tokens, character offsets, and h and c of every layer."""

    source: str
    tokens: list[str]
    token_ids: list[int]
    offsets: np.ndarray  # (T + 1,) character offset of each token
    gates: dict[str, np.ndarray]  # q -> (layers, T, H) for q in ON_QUANTITIES
    truncated: bool

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def packed(a: np.ndarray, dtype: str = "float32") -> dict:
    """An array as ``{"shape", "dtype", "data"}``: little-endian ``float16``, ``float32`` or
    ``int32``, base64 (a fraction of the size and encoding time of JSON numbers; the page
    decodes it into a typed array). NaN stays NaN."""
    kind = {"float16": "<f2", "float32": "<f4", "int32": "<i4"}[dtype]
    raw = np.ascontiguousarray(a, dtype=kind).tobytes()
    return {"shape": list(a.shape), "dtype": dtype, "data": base64.b64encode(raw).decode("ascii")}


class Inspector:
    """The model plus what the routes share: the prefix cache (one forward pass at a time), the
    lazily analysed match text, the example and the informative cells."""

    def __init__(
        self,
        model: LanguageModel,
        *,
        max_chars: int = MAX_CHARS,
        match_source=None,
        match_chars: int = MATCH_CHARS,
        cache_mb: float = CACHE_MB,
        name: str = "",
        article_first: bool = True,
    ):
        if max_chars < 1:
            raise ConfigError(f"max_chars must be >= 1; got {max_chars}")
        if not cache_mb >= 0:
            raise ConfigError(f"cache_mb must be >= 0; got {cache_mb}")
        self.model, self.max_chars, self.match_chars, self.name = (
            model,
            max_chars,
            match_chars,
            name,
        )
        self.tokenizer = model.require_tokenizer()
        self._match_source = match_source  # None, or () -> (text, description)
        self._match: MatchText | None = None
        self._match_error: str | None = None
        self._article_first = article_first  # the run's corpus is the stories corpus
        self._example: str | None = None
        self._informative: dict | None = None
        self._lock = threading.RLock()  # the lazily computed parts (which call each other)
        self.model_lock = threading.Lock()  # one forward pass at a time
        self.cache = PrefixCache(model, max_bytes=int(cache_mb * 2**20), model_lock=self.model_lock)
        # each token id's text, for the replies (and, in /api/info, for the page)
        self.vocab = [self.tokenizer.decode([i]) for i in range(self.tokenizer.vocab_size)]
        cfg = model.config
        self.num_layers, self.hidden_size = cfg.num_layers, cfg.hidden_size
        self.h_size = cfg.proj_size or cfg.hidden_size  # h is projected in an LSTMP

    @property
    def match_error(self) -> str | None:
        """Why the match text could not be read (None: it could, or it was not tried yet)."""
        return self._match_error

    # -- request fields
    def _text(self, body: dict) -> str:
        text = body.get("text")
        if not isinstance(text, str):
            raise RequestError(400, "send the text to look at as a string field 'text'")
        if len(text) > self.max_chars:
            raise RequestError(
                413,
                f"the text has {len(text):,} characters; the inspector takes at "
                f"most {self.max_chars:,} (shorten it, or restart "
                "`glasslstm serve` with a larger --max-chars)",
            )
        if not text:
            raise RequestError(400, "the text is empty; type at least one character")
        return text

    @staticmethod
    def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int:
        v = body.get(key, default)
        if v is None or isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(400, f"{key!r} must be an integer; got {v!r}")
        if not lo <= v <= hi:
            raise RequestError(400, f"{key!r} must be in {lo}..{hi}; got {v}")
        return v

    def _layer(self, body: dict) -> int:
        return self._int(body, "layer", 0, 0, self.num_layers - 1)

    @staticmethod
    def _threshold(body: dict) -> float:
        v = body.get("threshold", 0.5)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise RequestError(400, f"'threshold' must be a number; got {v!r}")
        return float(v)

    @staticmethod
    def _quantity(body: dict, allowed=QUANTITIES) -> str:
        q = body.get("quantity", "h")
        if q not in allowed:
            raise RequestError(400, f"'quantity' must be one of {', '.join(allowed)}; got {q!r}")
        return q

    def _cells(self, body: dict, most: int, quantity: str) -> list[int] | None:
        cells = body.get("cells")
        if cells is None:
            return None
        size = self.h_size if quantity == "h" else self.hidden_size
        if (
            not isinstance(cells, list)
            or not 1 <= len(cells) <= most
            or any(
                isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < size for c in cells
            )
        ):
            raise RequestError(
                400, f"'cells' must be a list of 1 to {most} cell numbers in 0..{size - 1}"
            )
        return list(dict.fromkeys(cells))  # unique, in the order given

    def _run(self, text: str):
        return self.cache.run(self.tokenizer.encode(text))  # DataError: outside the vocabulary

    def _span(self, body: dict, n_tokens: int) -> tuple[int, int]:
        start = self._int(body, "start", None, 0, n_tokens - 1)
        end = self._int(body, "end", None, start + 1, n_tokens)
        return start, end

    # -- what the page opens with
    def example(self) -> str:
        """The text the page opens with, already analysed: the article's passage for a stories
        model, else the opening of the match text; whichever the vocabulary can spell."""
        with self._lock:
            if self._example is None:
                self._example = self._pick_example()
            return self._example

    def _pick_example(self) -> str:
        candidates = [ARTICLE_EXAMPLE] if self._article_first else []
        match = self._try_match_text()
        if match is not None:
            text = match.text[:EXAMPLE_CHARS]
            cut = max(text.rfind("\n"), text.rfind(". ") + 1)
            candidates.append(text[:cut] if cut > len(text) // 3 else text)
        candidates.append(ARTICLE_EXAMPLE)
        for text in candidates:
            text = text[: self.max_chars]
            try:
                if text and self.tokenizer.encode(text):
                    return text
            except GlassLSTMError:
                continue
        # nothing spells: what the model itself writes
        sample = "".join(self.model.generate("", min(300, self.max_chars), seed=0))
        return sample[: self.max_chars] or self.tokenizer.decode([0])

    def informative(self) -> dict:
        """Per layer, every cell ranked by :func:`informative_cells` (bits about the next token
        beyond what the current token says), measured on the match text (else on the example):
        ``{"source", "layers"}``. Computed once (the first caller computes, others wait)."""
        with self._lock:
            if self._informative is None:
                self._informative = self._rank_cells()
            return self._informative

    def _rank_cells(self) -> dict:
        match = self._try_match_text()
        if match is not None and len(match.tokens) >= 2:
            h, ids, source = match.gates["h"], match.token_ids, match.source
        else:
            ids = self.tokenizer.encode(self.example())
            run = self.cache.run(ids)
            h = np.stack([run.values("h", k) for k in range(self.num_layers)])
            source = "the example text"
        if len(ids) < 2:
            layers = [[{"cell": k, "bits": 0.0} for k in range(self.hidden_size)]] * len(h)
        else:
            layers = [informative_cells(h[k], ids) for k in range(len(h))]
        return {"source": source, "layers": layers}

    def warm(self) -> None:
        """Compute now what the first page load needs (match text, informative cells, the
        example's analysis), so that it opens at once and a broken match text shows early."""
        self.informative()
        self.cache.run(self.tokenizer.encode(self.example()))

    # -- routes
    def info(self) -> dict:
        inf = self.informative()
        return {
            "name": self.name,
            "level": self.tokenizer.level,
            "vocab_size": self.tokenizer.vocab_size,
            "vocab": self.vocab,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "quantities": list(QUANTITIES),
            "on_quantities": list(ON_QUANTITIES),
            "max_chars": self.max_chars,
            "max_cells": MAX_CELLS,
            "example": self.example(),
            "informative": {
                "source": inf["source"],
                "measure": "bits about the next token beyond what the current token says",
                "layers": [layer[:HEAT_CELLS] for layer in inf["layers"]],
            },
            "match": self._match_source is not None and self._match_error is None,
            "match_error": self._match_error,
            "pattern_cells": PATTERN_CELLS,
            "tolerance": TOLERANCE,
        }

    def analyze(self, body: dict) -> dict:
        """The page's view of a text: tokens, the chosen quantity of the chosen layer for the
        chosen cells (default: the layer's most informative) with their colour scale, the top
        guesses after every token, and the ``top_k`` next tokens after the last one."""
        text = self._text(body)
        layer, q = self._layer(body), self._quantity(body)
        cells = self._cells(body, MAX_CELLS, q)
        top_k = self._int(body, "top_k", 10, 1, MAX_TOP_K)
        if cells is None:
            cells = [c["cell"] for c in self.informative()["layers"][layer][:HEAT_CELLS]]
        run = self._run(text)
        values = run.values(q, layer, cells)  # (T, K)
        g_ids, g_p = run.guesses()
        nxt = run.next_probs()
        order = np.argsort(-nxt, kind="stable")[:top_k]
        return {
            "text": "".join(self.vocab[i] for i in run.ids),
            "token_ids": packed(np.asarray(run.ids), "int32"),  # /api/info's vocab: the texts
            "level": self.tokenizer.level,
            "layer": layer,
            "quantity": q,
            "cells": cells,
            "values": packed(values, "float16"),  # as the prefix cache keeps them
            "scale": colour_scale(values, q),
            "guess_ids": packed(g_ids, "int32"),  # token ids: /api/info's vocab
            "guess_probs": packed(g_p),
            "target_prob": packed(run.target_prob()),
            "next": [{"token": self.vocab[i], "prob": round(float(nxt[i]), 4)} for i in order],
        }

    def cells_on(self, body: dict) -> dict:
        text, layer = self._text(body), self._layer(body)
        threshold, q = self._threshold(body), self._quantity(body, ON_QUANTITIES)
        run = self._run(text)
        start, end = self._span(body, len(run))
        return {
            "layer": layer,
            "quantity": q,
            "threshold": threshold,
            "start": start,
            "end": end,
            "span": "".join(self.vocab[i] for i in run.ids[start:end]),
            "cells": cells_on(run.values(q, layer), start, end, threshold),
        }

    def match(self, body: dict) -> dict:
        """Spans of the match text where the selected span's pattern of cells is on: by default
        its :data:`PATTERN_CELLS` most distinctive "on" cells (those on least often in the match
        text, and at fewer than half of its tokens), :data:`TOLERANCE` of which may be off at a
        step; or the given ``cells``."""
        threshold = self._threshold(body)
        q, layer = self._quantity(body, ON_QUANTITIES), self._layer(body)
        cells = self._cells(body, self.hidden_size, q)
        n_pattern = self._int(body, "pattern_cells", PATTERN_CELLS, 1, self.hidden_size)
        top = self._int(body, "top", 10, 1, 100)
        m = self.match_text()
        values = m.gates[q][layer]  # (T, H)
        if cells is None:
            found = self.cells_on(body)
            on = [c["cell"] for c in found["cells"]]
            if not on:
                raise RequestError(
                    400,
                    f"no cell stays above {threshold:g} across the span; lower "
                    "the threshold or select a shorter span",
                )
            pattern = [
                p
                for p in pattern_cells(values, on, threshold, n_pattern)
                if p["on_fraction"] < DISTINCTIVE
            ]
            if not pattern:
                raise RequestError(
                    400,
                    f"each of the {len(on)} cells above {threshold:g} across the span is above "
                    f"it at most tokens of {m.source} too, so they single out nothing; raise "
                    "the threshold",
                )
            length, n_on = found["end"] - found["start"], len(on)
        else:
            pattern = pattern_cells(values, cells, threshold, len(cells))
            pattern.sort(key=lambda p: cells.index(p["cell"]))
            length, n_on = self._int(body, "length", 1, 1, self.match_chars), len(cells)
        chosen = [p["cell"] for p in pattern]
        tolerance = self._int(body, "tolerance", TOLERANCE, 0, self.hidden_size)
        tolerance = min(tolerance, len(chosen) - 1)
        matches = find_matches(values, chosen, threshold, length, top, tolerance)
        text = m.text
        for f in matches:
            a, b = int(m.offsets[f["start"]]), int(m.offsets[f["end"]])
            cut = b - a > SPAN_CHARS  # a long run: its beginning and end
            f.update(
                before=text[max(0, a - CONTEXT_CHARS) : a],
                span=text[a : a + SPAN_CHARS // 2] + " \u2026 " + text[b - SPAN_CHARS // 2 : b]
                if cut
                else text[a:b],
                span_cut=cut,
                after=text[b : b + CONTEXT_CHARS],
            )
        return {
            "cells": chosen,
            "pattern": pattern,
            "cells_on_span": n_on,
            "tolerance": tolerance,
            "need": len(chosen) - tolerance,
            "length": length,
            "layer": layer,
            "quantity": q,
            "threshold": threshold,
            "source": m.source,
            "searched_tokens": len(m.tokens),
            "searched_truncated": m.truncated,
            "matches": matches,
        }

    # -- the match text
    def _try_match_text(self) -> MatchText | None:
        """The match text, or None when there is none or it cannot be read (the reason is kept
        for /api/info and the page)."""
        if self._match_source is None:
            return None
        try:
            return self.match_text()
        except (GlassLSTMError, OSError):
            return None

    def match_text(self) -> MatchText:
        """The match text, analysed on first use (a few seconds for a large model)."""
        if self._match_source is None:
            raise RequestError(
                400,
                "there is no text to search: start `glasslstm serve` on a run "
                "directory, or give --data",
            )
        with self._lock:
            if self._match_error is not None:  # tried once: say why, without reading it again
                raise DataError(self._match_error)
            if self._match is None:
                try:
                    self._match = self._analyze_match_text()
                except (GlassLSTMError, OSError) as e:
                    self._match_error = f"the match view is off: {e}"
                    raise DataError(self._match_error) from None
            return self._match

    def _analyze_match_text(self) -> MatchText:
        text, source = self._match_source()
        if not text:
            raise DataError(f"the match text ({source}) is empty")
        cut = text[: self.match_chars]
        with self.model_lock:
            a = analyze(self.model, cut, top_k=1, max_tokens=self.match_chars)
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in a.tokens])])
        return MatchText(
            source,
            a.tokens,
            a.token_ids,
            offsets,
            {q: a.gates[q] for q in ON_QUANTITIES},
            len(cut) < len(text) or a.truncated,
        )


def match_source(
    run_dir=None,
    *,
    val_text: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
):
    """A loader ``() -> (text, description)`` for the match text, or None when there is none:
    ``val_text`` as given; else ``data`` (a text file, whole; a corpus name, its validation
    split); else the run's own corpus's validation split."""
    if val_text is not None:
        return lambda: (val_text, "the given text")
    if data is None and run_dir is None:
        return None

    def load():
        if data and Path(data).is_file():
            raw, what = Path(data).read_bytes(), data
        else:
            trained, trained_dir = (
                training_data(run_dir, required=not data) if run_dir is not None else (None, None)
            )
            # a run trained on split files: its validation file
            own = training_splits(run_dir) if run_dir is not None and not data else {}
            splits = {k: v for k, v in own.items() if v is not None}
            corpus = load_corpus(data or trained, data_dir=data_dir or trained_dir, **splits)
            raw, what = corpus.val, f"the validation split of {corpus.name}"
        try:
            return raw.decode("utf-8"), what
        except UnicodeDecodeError as e:
            raise DataError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})") from None

    return load

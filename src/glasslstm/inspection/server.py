"""The web inspector behind ``glasslstm serve``: a Starlette app over :func:`analyze`.

Routes (JSON in, JSON out; every error is ``{"error": message}`` with a 4xx/5xx status, never a
traceback):

- ``GET  /``              the page (``static/index.html`` + ``app.js`` + ``style.css``)
- ``GET  /api/info``      the model: level, layers, cells, quantities, the input cap
- ``POST /api/analyze``   ``{text, layer=0, quantities=[...], top_k=10}`` -> tokens, the chosen
  layer's gates ``(T, H)`` per quantity, top-k next tokens at every position, and ``next``: the
  distribution after the last token
- ``POST /api/cells_on``  ``{text, layer, start, end, threshold=0.5, quantity="h"}`` -> the cells
  whose value stays above ``threshold`` at every token of the span ``[start, end)``
- ``POST /api/match``     the same (or ``cells=[...]``) -> spans of the match text (the run's
  validation split by default) where those cells are all on, best first (LSTMVis's match view,
  Strobelt et al. 2017)
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from glasslstm.data import load_corpus
from glasslstm.errors import ConfigError, DataError
from glasslstm.inspection.analysis import QUANTITIES, analyze
from glasslstm.model import LanguageModel, training_data

STATIC = Path(__file__).parent / "static"
MAX_CHARS = 2000  # typed text: one forward pass per keystroke pause stays interactive
MATCH_CHARS = 20_000  # the match text is analysed once; h and c of every step stay in memory
MAX_TOP_K = 50
ON_QUANTITIES = ("h", "c")  # "on" means the state is high: LSTMVis thresholds h (c also works)
CONTEXT_CHARS = 40  # excerpt around a match, each side
log = logging.getLogger("glasslstm.serve")


class RequestError(Exception):
    """A bad request; ``message`` is shown to the user as it is."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ------------------------------------------------------------------------ the math, in NumPy
def cells_on(values: np.ndarray, start: int, end: int, threshold: float) -> list[dict]:
    """Cells of ``values`` ``(T, H)`` above ``threshold`` at every step of ``[start, end)``,
    strongest (highest minimum) first, as ``{"cell", "min", "mean"}``."""
    span = values[start:end]  # (L, H)
    on = np.flatnonzero((span > threshold).all(0))
    lo, mean = span.min(0), span.mean(0)
    on = on[np.argsort(-lo[on], kind="stable")]
    return [
        {"cell": int(c), "min": round(float(lo[c]), 4), "mean": round(float(mean[c]), 4)}
        for c in on
    ]


def find_matches(
    values: np.ndarray, cells: list[int], threshold: float, length: int, top: int = 10
) -> list[dict]:
    """Maximal spans of ``values`` ``(T, H)`` where every cell in ``cells`` is above ``threshold``.

    Score (in (0, 1], best first) = length similarity ``min(L, length) / max(L, length)`` times
    precision ``len(cells) / (cells on across the whole span)``: a span of the query's length in
    which only the selected cells are on scores 1 (LSTMVis ranks matches the same way: by length
    and by how few other cells join in).
    """
    all_on = (values[:, cells] > threshold).all(1)  # (T,)
    edges = np.diff(np.concatenate([[0], all_on.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lens = ends - starts
    sim = np.minimum(lens, length) / np.maximum(lens, length)
    best: list[dict] = []
    # precision <= 1, so a span's score is at most its length similarity: visit spans in that
    # order and stop once no later one can enter the top list.
    for j in np.argsort(-sim, kind="stable"):
        if len(best) >= top and sim[j] <= best[-1]["score"]:
            break
        a, b = int(starts[j]), int(ends[j])
        n_on = int((values[a:b] > threshold).all(0).sum())
        score = float(sim[j]) * len(cells) / n_on
        best.append({"start": a, "end": b, "score": round(score, 4), "cells_on": n_on})
        best.sort(key=lambda m: (-m["score"], m["start"]))
        del best[top:]
    return best


# ------------------------------------------------------------------------ the inspector
@dataclass
class _MatchText:
    """The analysed match text: tokens, character offsets, and h and c of every layer."""

    source: str
    tokens: list[str]
    offsets: np.ndarray  # (T + 1,) character offset of each token
    gates: dict[str, np.ndarray]  # q -> (layers, T, H) for q in ON_QUANTITIES
    truncated: bool

    @property
    def text(self) -> str:
        return "".join(self.tokens)


class Inspector:
    """The model plus what the routes share: a lock (one forward pass at a time) and the lazily
    analysed match text. Each method takes a request's JSON body and returns the reply's."""

    def __init__(
        self,
        model: LanguageModel,
        *,
        max_chars: int = MAX_CHARS,
        match_source=None,
        match_chars: int = MATCH_CHARS,
        name: str = "",
    ):
        if max_chars < 1:
            raise ConfigError(f"max_chars must be >= 1; got {max_chars}")
        self.model, self.max_chars, self.match_chars, self.name = (
            model,
            max_chars,
            match_chars,
            name,
        )
        self._match_source = match_source  # None, or () -> (text, description)
        self._match: _MatchText | None = None
        self._lock = threading.Lock()
        cfg = model.config
        self.num_layers, self.hidden_size = cfg.num_layers, cfg.hidden_size

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

    def _int(self, body: dict, key: str, default: int | None, lo: int, hi: int) -> int:
        v = body.get(key, default)
        if v is None or isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(400, f"{key!r} must be an integer; got {v!r}")
        if not lo <= v <= hi:
            raise RequestError(400, f"{key!r} must be in {lo}..{hi}; got {v}")
        return v

    def _layer(self, body: dict) -> int:
        return self._int(body, "layer", 0, 0, self.num_layers - 1)

    def _threshold(self, body: dict) -> float:
        v = body.get("threshold", 0.5)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise RequestError(400, f"'threshold' must be a number; got {v!r}")
        return float(v)

    def _on_quantity(self, body: dict) -> str:
        q = body.get("quantity", "h")
        if q not in ON_QUANTITIES:
            raise RequestError(
                400, f"'quantity' must be one of {', '.join(ON_QUANTITIES)}; got {q!r}"
            )
        return q

    def _analyze(self, text: str, top_k: int = 1):
        with self._lock:
            return analyze(self.model, text, top_k=top_k)

    def _span(self, body: dict, n_tokens: int) -> tuple[int, int]:
        start = self._int(body, "start", None, 0, n_tokens - 1)
        end = self._int(body, "end", None, start + 1, n_tokens)
        return start, end

    # -- routes
    def info(self) -> dict:
        tok = self.model.require_tokenizer()
        return {
            "name": self.name,
            "level": tok.level,
            "vocab_size": tok.vocab_size,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "quantities": list(QUANTITIES),
            "on_quantities": list(ON_QUANTITIES),
            "max_chars": self.max_chars,
            "match": self._match_source is not None,
        }

    def analyze(self, body: dict) -> dict:
        text = self._text(body)
        layer = self._layer(body)
        top_k = self._int(body, "top_k", 10, 1, MAX_TOP_K)
        wanted = body.get("quantities", list(QUANTITIES))
        if not isinstance(wanted, list) or not wanted or any(q not in QUANTITIES for q in wanted):
            raise RequestError(
                400, f"'quantities' must be a list drawn from {', '.join(QUANTITIES)}"
            )
        a = self._analyze(text, top_k)
        top = [[{"token": t, "prob": round(p, 4)} for t, p in row] for row in a.top]
        return {
            "text": a.text,
            "tokens": a.tokens,
            "level": a.level,
            "layer": layer,
            "num_layers": a.num_layers,
            "hidden_size": a.hidden_size,
            "gates": {q: np.round(a.values(q, layer), 4).tolist() for q in dict.fromkeys(wanted)},
            "top": top,
            "next": top[-1],
            "target_prob": [None if np.isnan(p) else round(float(p), 4) for p in a.target_prob],
        }

    def cells_on(self, body: dict) -> dict:
        text, layer = self._text(body), self._layer(body)
        threshold, q = self._threshold(body), self._on_quantity(body)
        a = self._analyze(text)
        start, end = self._span(body, len(a))
        return {
            "layer": layer,
            "quantity": q,
            "threshold": threshold,
            "start": start,
            "end": end,
            "span": "".join(a.tokens[start:end]),
            "cells": cells_on(a.values(q, layer), start, end, threshold),
        }

    def match(self, body: dict) -> dict:
        threshold, q, layer = self._threshold(body), self._on_quantity(body), self._layer(body)
        cells = body.get("cells")
        if cells is None:
            found = self.cells_on(body)
            cells, length = [c["cell"] for c in found["cells"]], found["end"] - found["start"]
            if not cells:
                raise RequestError(
                    400,
                    f"no cell stays above {threshold:g} across the span; lower "
                    "the threshold or select a shorter span",
                )
        else:
            if (
                not isinstance(cells, list)
                or not cells
                or any(
                    isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.hidden_size
                    for c in cells
                )
            ):
                raise RequestError(
                    400,
                    f"'cells' must be a non-empty list of cell numbers in "
                    f"0..{self.hidden_size - 1}",
                )
            length = self._int(body, "length", 1, 1, self.match_chars)
        top = self._int(body, "top", 10, 1, 100)
        m = self.match_text()
        matches = find_matches(m.gates[q][layer], sorted(set(cells)), threshold, length, top)
        text = m.text
        for f in matches:
            a, b = int(m.offsets[f["start"]]), int(m.offsets[f["end"]])
            f.update(
                before=text[max(0, a - CONTEXT_CHARS) : a],
                span=text[a:b],
                after=text[b : b + CONTEXT_CHARS],
            )
        return {
            "cells": sorted(set(cells)),
            "length": length,
            "layer": layer,
            "quantity": q,
            "threshold": threshold,
            "source": m.source,
            "searched_tokens": len(m.tokens),
            "searched_truncated": m.truncated,
            "matches": matches,
        }

    def match_text(self) -> _MatchText:
        """The match text, analysed on first use (a few seconds for a large model)."""
        if self._match_source is None:
            raise RequestError(
                400,
                "there is no text to search: start `glasslstm serve` on a run "
                "directory, or give --data",
            )
        with self._lock:
            if self._match is None:
                text, source = self._match_source()
                if not text:
                    raise DataError(f"the match text ({source}) is empty")
                cut = text[: self.match_chars]
                a = analyze(self.model, cut, top_k=1, max_tokens=self.match_chars)
                offsets = np.concatenate([[0], np.cumsum([len(t) for t in a.tokens])])
                self._match = _MatchText(
                    source,
                    a.tokens,
                    offsets,
                    {q: a.gates[q] for q in ON_QUANTITIES},
                    len(cut) < len(text) or a.truncated,
                )
            return self._match


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
            corpus = load_corpus(data or trained, data_dir=data_dir or trained_dir)
            raw, what = corpus.val, f"the validation split of {corpus.name}"
        try:
            return raw.decode("utf-8"), what
        except UnicodeDecodeError as e:
            raise DataError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})") from None

    return load


# ------------------------------------------------------------------------ the app
async def _json_body(request: Request, limit: int) -> dict:
    """The request's JSON object, read up to ``limit`` bytes (so a huge body is refused early)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request is too large ({int(declared):,} bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, "the request is too large")
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return data


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _on_request_error(request, exc: Exception):
    assert isinstance(exc, RequestError)
    return _error(exc.status, exc.message)


async def _on_user_error(request, exc: Exception):
    # DataError (text outside the vocabulary), ConfigError, analyze's ValueErrors: their
    # messages are written for users.
    return _error(400, str(exc))


async def _on_http_error(request, exc: Exception):
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail))


async def _on_crash(request, exc: Exception):
    log.error("glasslstm serve: %s failed", request.url.path, exc_info=exc)  # the log keeps it
    return _error(500, f"internal error ({type(exc).__name__}); the server's log has the details")


def create_app(
    run_dir_or_model,
    *,
    max_chars: int = MAX_CHARS,
    val_text: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    match_chars: int = MATCH_CHARS,
    which: str = "best",
) -> Starlette:
    """The inspector app for a run directory (or a loaded :class:`LanguageModel`).

    ``max_chars`` caps the typed text. The match view searches ``val_text`` if given, else
    ``data`` (see :func:`match_source`), else the run's validation split, cut to
    ``match_chars`` characters and analysed once, on the first match request.
    """
    if isinstance(run_dir_or_model, LanguageModel):
        model, run_dir, name = run_dir_or_model.eval(), None, "model"
    else:
        run_dir = Path(run_dir_or_model)
        model, name = LanguageModel.load(run_dir, which=which), run_dir.name
    insp = Inspector(
        model,
        max_chars=max_chars,
        match_chars=match_chars,
        name=name,
        match_source=match_source(run_dir, val_text=val_text, data=data, data_dir=data_dir),
    )
    limit = 12 * max_chars + 65_536  # JSON may escape a character as 12 bytes (a surrogate pair)

    def post(method):
        async def endpoint(request: Request) -> JSONResponse:
            body = await _json_body(request, limit)
            return JSONResponse(await run_in_threadpool(method, body))

        return endpoint

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(insp.info())

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/info", info),
            Route("/api/analyze", post(insp.analyze), methods=["POST"]),
            Route("/api/cells_on", post(insp.cells_on), methods=["POST"]),
            Route("/api/match", post(insp.match), methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={
            RequestError: _on_request_error,
            ValueError: _on_user_error,
            HTTPException: _on_http_error,
            Exception: _on_crash,
        },
    )
    app.state.inspector = insp
    return app

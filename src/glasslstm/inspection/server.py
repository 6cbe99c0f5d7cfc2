"""The web inspector behind ``glasslstm serve``: a Starlette app over
:class:`~glasslstm.inspection.inspector.Inspector`.

Routes (JSON in, JSON out; every error is ``{"error": message}`` with a 4xx/5xx status, never a
traceback):

- ``GET  /``              the page (``static/index.html`` + ``app.js`` + ``style.css``)
- ``GET  /api/info``      the model (level, layers, cells, quantities, the input cap), the
  example text the page opens with, and each layer's most informative cells
- ``POST /api/analyze``   ``{text, layer=0, quantity="h", cells=[informative], top_k=10}`` ->
  ``token_ids`` (their texts: /api/info's ``vocab``); ``values``: the quantity of the layer
  for those cells, ``(T, len(cells))`` float16 as base64; ``scale``: their colour scale;
  ``guess_ids``/``guess_probs``: the 3 likeliest next tokens after each token;
  ``target_prob``; ``next``: the ``top_k`` likeliest tokens after the last one. Only what the
  page shows: other cells, layers and quantities are fetched when chosen.
- ``POST /api/cells_on``  ``{text, layer, start, end, threshold=0.5, quantity="h"}`` -> the cells
  whose value stays above ``threshold`` at every token of the span ``[start, end)``
- ``POST /api/match``     the same (or ``cells=[...]``, ``length``) plus ``pattern_cells=5``,
  ``tolerance=1`` -> spans of the match text (the run's validation split by default) where the
  span's most distinctive on-cells are on together (all but ``tolerance`` of them), best first
  (LSTMVis's match view, Strobelt et al. 2017)

Who may talk to it: only requests whose ``Host`` is a name the server was started under
(loopback names unless ``--host`` says otherwise; a page on another site that re-points its
own name at 127.0.0.1 -- DNS rebinding -- is refused), with no ``Origin`` or the server's own
(a page on another site cannot post to it), and POST bodies only as ``application/json`` (a
cross-site form cannot send that without the browser asking first). Every response carries a
Content-Security-Policy (scripts, styles and connections from this server only, no framing)
and X-Content-Type-Options, X-Frame-Options and Referrer-Policy. Bodies are parsed under limits
of size and nesting depth.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glasslstm import rundir
from glasslstm.errors import GlassLSTMError, RunDirError
from glasslstm.inspection.inspector import (
    CACHE_MB,
    MATCH_CHARS,
    MAX_CHARS,
    Inspector,
    RequestError,
    match_source,
)
from glasslstm.model import LanguageModel

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
MAX_DEPTH = 8  # the API's bodies nest 2 deep; 20,000 nested "[" must not reach the parser
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
log = logging.getLogger("glasslstm.serve")

__all__ = ["LOOPBACK_HOSTS", "create_app", "json_depth", "load_model"]


# ------------------------------------------------------------------------ guards
class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every HTTP response (errors included), and
    ``Cache-Control: no-store`` on the API's (its answers depend on what was sent)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope.get("path", "").startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers[k] = v
                if api:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


class SameOrigin:
    """ASGI middleware: a request that carries an ``Origin`` other than the server's own (the
    scheme and the ``Host`` it was sent to) gets 403. Browsers send ``Origin`` with every POST
    and every cross-site request; tools that send none (curl, scripts) are let through."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            origin = request.headers.get("origin")
            own = f"{scope.get('scheme', 'http')}://{request.headers.get('host', '')}".lower()
            if origin is not None and origin.lower() != own:
                response = _error(
                    403,
                    f"requests from {origin} are refused: only pages served by this "
                    "inspector may use it",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(body: bytes) -> int:
    """How deep the brackets of a JSON document nest (brackets inside strings do not count)."""
    a = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    if not a.size:
        return 0
    opens = (a == ord("[")) | (a == ord("{"))
    closes = (a == ord("]")) | (a == ord("}"))
    return int((np.cumsum(opens, dtype=np.int64) - np.cumsum(closes, dtype=np.int64)).max())


async def _json_body(request: Request, limit: int) -> dict:
    """The request's JSON object: ``application/json`` only, read up to ``limit`` bytes (a huge
    body is refused early), nested at most :data:`MAX_DEPTH` deep."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(
            415,
            f"send the request body as JSON with Content-Type: application/json "
            f"(got {kind or 'no content type'!s})",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request is too large ({int(declared):,} bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, "the request is too large")
    if json_depth(bytes(body)) > MAX_DEPTH:
        raise RequestError(400, f"the request body nests deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return data


# ------------------------------------------------------------------------ errors
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


def _crash(path: str, exc: Exception) -> JSONResponse:
    log.error("glasslstm serve: %s failed", path, exc_info=exc)  # the log keeps the traceback
    return _error(500, f"internal error ({type(exc).__name__}); the server's log has the details")


async def _on_crash(request, exc: Exception):
    return _crash(request.url.path, exc)


async def _answer(request: Request, method, *args) -> JSONResponse:
    """``method(*args)`` in a worker thread, as JSON. A crash is answered here (inside the
    middleware, so the reply carries the security headers); user errors go to their handlers."""
    try:
        return JSONResponse(await run_in_threadpool(method, *args))
    except (RequestError, ValueError):
        raise
    except Exception as exc:
        return _crash(request.url.path, exc)


# ------------------------------------------------------------------------ the app
def load_model(run_dir, which: str = "best") -> LanguageModel:
    """``LanguageModel.load`` with every way a run directory can be broken as one RunDirError
    line (naming the directory and what was wrong), never a traceback from deep inside."""
    path = Path(run_dir)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise RunDirError(
            f"{path} {what}: give a run directory written by `glasslstm train --out DIR`"
        )
    try:
        return LanguageModel.load(path, which=which)
    except GlassLSTMError as e:
        if str(path) in str(e):
            raise
        raise RunDirError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError) as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise RunDirError(
            f"{path} cannot be loaded ({type(e).__name__}: {detail or 'no detail'}): its files "
            "are damaged or from another program; restore them, or train again with "
            "`glasslstm train --out DIR`"
        ) from None
    except OSError as e:
        raise RunDirError(f"{path} cannot be read: {e.strerror or e}") from None


def _stories_run(run_dir: Path) -> bool:
    """Whether the run was trained on the built-in stories corpus (the article's world)."""
    try:
        train = rundir.read_config(run_dir).get("train")
    except (ValueError, AttributeError, OSError):
        return False
    # a directory written by LanguageModel.save records no training data: not known to be stories
    return isinstance(train, dict) and train.get("data") in (None, "stories")


def create_app(
    run_dir_or_model,
    *,
    max_chars: int = MAX_CHARS,
    val_text: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    match_chars: int = MATCH_CHARS,
    cache_mb: float = CACHE_MB,
    which: str = "best",
    quantize: str | None = None,
    allowed_hosts=LOOPBACK_HOSTS,
) -> Starlette:
    """The inspector app for a run directory (or a loaded :class:`LanguageModel`).

    ``max_chars`` caps the typed text. The match view searches ``val_text`` if given, else
    ``data`` (see :func:`~glasslstm.inspection.inspector.match_source`), else the run's
    validation split, cut to ``match_chars`` characters and analysed once, when first needed.
    ``cache_mb`` bounds the prefix cache (:mod:`glasslstm.inspection.prefix`).
    ``allowed_hosts``: the names (``Host`` headers, without the port) it answers to.
    ``quantize``: "int8" rounds the model's weights to int8 (:mod:`glasslstm.quantize`) first.
    """
    if isinstance(run_dir_or_model, LanguageModel):
        model, run_dir, name, stories = run_dir_or_model.eval(), None, "model", True
    else:
        run_dir = Path(run_dir_or_model)
        model, name = load_model(run_dir, which=which), run_dir.name
        stories = _stories_run(run_dir)
    if quantize:
        from glasslstm.quantize import quantize as quantize_model

        quantize_model(model, quantize)
    insp = Inspector(
        model,
        max_chars=max_chars,
        match_chars=match_chars,
        cache_mb=cache_mb,
        name=name,
        match_source=match_source(run_dir, val_text=val_text, data=data, data_dir=data_dir),
        article_first=stories,
    )
    limit = 12 * max_chars + 65_536  # JSON may escape a character as 12 bytes (a surrogate pair)

    def post(method):
        async def endpoint(request: Request) -> JSONResponse:
            return await _answer(request, method, await _json_body(request, limit))

        return endpoint

    async def info(request: Request) -> JSONResponse:
        return await _answer(request, insp.info)

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
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)),
            Middleware(SameOrigin),
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

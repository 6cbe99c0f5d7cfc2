"""The web inspector's API (glasslstm.inspection.server) through Starlette's test client, its
arithmetic (spans.py) and prefix cache (prefix.py), and the `glasslstm serve` command."""

import base64
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from conftest import STORY
from glasslstm.cli import build_parser, main
from glasslstm.inspection import analyze
from glasslstm.inspection.common import QUANTITIES
from glasslstm.inspection.inspector import ARTICLE_EXAMPLE, HEAT_CELLS, MAX_CELLS, match_source
from glasslstm.inspection.prefix import PrefixCache
from glasslstm.inspection.server import SECURITY_HEADERS, create_app, json_depth
from glasslstm.inspection.spans import (
    cells_on,
    colour_scale,
    find_matches,
    informative_cells,
    pattern_cells,
)
from glasslstm.model import LanguageModel

TEXT = 'Bob is a nice person. "Run," said Bob.'
BASE = "http://127.0.0.1"  # the app answers to loopback names only
F16 = 2e-3  # the prefix cache keeps values as float16: 3 significant digits


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """`glasslstm serve` sets torch's thread count (--threads) for its process: put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tiny_run):
    return LanguageModel.load(tiny_run)


@pytest.fixture(scope="module")
def app(tiny_run):
    return create_app(tiny_run, max_chars=400, val_text=STORY * 2)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url=BASE) as c:
        yield c


def unpack(p) -> np.ndarray:
    kind = {"float16": "<f2", "float32": "<f4", "int32": "<i4"}[p["dtype"]]
    return np.frombuffer(base64.b64decode(p["data"]), dtype=kind).reshape(p["shape"])


def close(got, want, rel=F16):
    """float16-stored values against float32 ones: a relative tolerance (c can reach ~20)."""
    want = np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel)


def assert_clean_error(resp, status, *words):
    """An error reply: the status, one JSON message naming the problem, no traceback."""
    assert resp.status_code == status, resp.text
    msg = resp.json()["error"]
    assert isinstance(msg, str) and msg
    for w in words:
        assert w in msg
    for leak in ("Traceback", 'File "', "line ", ".py"):
        assert leak not in resp.text


# ------------------------------------------------------------------ the page and /api/info
def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in (
        'id="text"',
        'id="next"',
        'id="heatmap"',
        'id="heat-x"',
        'id="heat-y"',
        'id="colorbar"',
        'id="threshold"',
        'id="cells-on"',
        'id="match"',
        'id="tolerance"',
        'id="matches"',
        'id="error"',
    ):
        assert element in page.text
    assert "/api/analyze" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200


def test_info_describes_the_model_the_example_and_the_informative_cells(client, app, model):
    info = client.get("/api/info").json()
    assert info["num_layers"] == model.config.num_layers == 2
    assert info["hidden_size"] == model.config.hidden_size == 32
    assert info["level"] == "char" and info["max_chars"] == 400 and info["match"] is True
    assert info["vocab"] == [model.tokenizer.decode([i]) for i in range(model.tokenizer.vocab_size)]
    # the page opens on an example the model can read: the article's passage here
    assert info["example"] == ARTICLE_EXAMPLE
    model.tokenizer.encode(info["example"])
    # the most informative cells of each layer, measured on the match text, most first
    inf = info["informative"]
    assert inf["source"] == "the given text" and len(inf["layers"]) == 2
    m = app.state.inspector.match_text()
    for layer, ranked in enumerate(inf["layers"]):
        assert len(ranked) == HEAT_CELLS
        expected = informative_cells(m.gates["h"][layer], m.token_ids)[:HEAT_CELLS]
        assert ranked == expected
        bits = [c["bits"] for c in ranked]
        assert bits == sorted(bits, reverse=True) and bits[0] > 0


def test_the_example_is_the_opening_of_the_match_text_for_other_corpora(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "other-corpus"
    shutil.copytree(tiny_run, run)
    text_file = tmp_path / "other.txt"
    text_file.write_text(STORY * 3, encoding="utf-8")
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["data"] = str(text_file)  # trained on a text file: not the article's world
    (run / "config.json").write_text(json.dumps(cfg))
    insp = create_app(run).state.inspector
    ex = insp.example()
    assert ex != ARTICLE_EXAMPLE and ex.endswith(".")
    assert insp.match_text().text.startswith(ex)


# ------------------------------------------------------------------ /api/analyze
def test_analyze_sends_what_the_page_shows(client, model):
    cells = [3, 17, 5]
    r = client.post(
        "/api/analyze",
        json={"text": TEXT, "layer": 1, "quantity": "c", "cells": cells, "top_k": 4},
    )
    assert r.status_code == 200, r.text
    d = r.json()
    a = analyze(model, TEXT, top_k=3)
    T = len(TEXT)
    assert unpack(d["token_ids"]).tolist() == a.token_ids
    assert d["text"] == TEXT and d["cells"] == cells
    assert (d["layer"], d["quantity"]) == (1, "c")
    values = unpack(d["values"])
    assert values.shape == (T, len(cells))
    close(values, a.values("c", 1)[:, cells])
    assert d["scale"] == colour_scale(values, "c")
    # the three likeliest next tokens after every token (ids into /api/info's vocab)
    g_ids, g_p = unpack(d["guess_ids"]), unpack(d["guess_probs"])
    assert g_ids.shape == g_p.shape == (T, 3)
    vocab = client.get("/api/info").json()["vocab"]
    for t in (0, T // 2, T - 1):
        assert [vocab[i] for i in g_ids[t]] == [tok for tok, _ in a.top[t]]
        np.testing.assert_allclose(g_p[t], [p for _, p in a.top[t]], atol=1e-5)
    target = unpack(d["target_prob"])
    np.testing.assert_allclose(target[:-1], a.target_prob[:-1], atol=1e-5)
    assert np.isnan(target[-1])
    assert [n["token"] for n in d["next"]] == [p.text for p in model.predict_next(TEXT, top=4)]
    probs = [n["prob"] for n in d["next"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_analyze_defaults_to_the_most_informative_cells_and_h(client, model):
    info = client.get("/api/info").json()
    d = client.post("/api/analyze", json={"text": TEXT}).json()
    assert d["layer"] == 0 and d["quantity"] == "h"
    assert d["cells"] == [c["cell"] for c in info["informative"]["layers"][0]]
    close(unpack(d["values"]), analyze(model, TEXT).values("h", 0)[:, d["cells"]])


def test_analyze_of_a_long_text_stays_small(tiny_run):
    """2,000 characters: the reply holds the heatmap's cells only (a 2 x 256 model's whole
    layer would be 2,000 x 256 values); asking for more than MAX_CELLS cells is refused."""
    app = create_app(tiny_run, val_text=STORY * 2)
    text = (STORY * 11)[:2000]
    with TestClient(app, base_url=BASE) as c:
        r = c.post("/api/analyze", json={"text": text, "cells": list(range(32))})
        assert r.status_code == 200
        assert unpack(r.json()["values"]).shape == (2000, 32)
        # per value: 2 bytes of base64'd float16 (2.7 characters), no JSON number
        assert r.json()["values"]["dtype"] == "float16"
        assert len(r.content) < 2000 * 32 * 3 + 2000 * 60
        too_many = c.post("/api/analyze", json={"text": text, "cells": list(range(MAX_CELLS + 1))})
    assert_clean_error(too_many, 400, "'cells'", f"1 to {MAX_CELLS}")


def test_typing_reuses_the_beginning_and_gives_the_same_values(tiny_run, model):
    """A text that begins like an earlier one reuses its chunks (the model runs only from where
    they differ), and the values are those of a fresh, uninterrupted pass."""
    app = create_app(tiny_run, max_chars=2000, val_text=STORY)
    cache = app.state.inspector.cache
    first = (STORY * 4)[:300]
    second = first[:250] + "Dan is evil. Bob can swim."  # differs from token 250 on
    with TestClient(app, base_url=BASE) as c:
        c.post("/api/analyze", json={"text": first, "layer": 1, "cells": [0]})
        hits = cache.hits
        for text in (second, second + " He"):
            d = c.post(
                "/api/analyze", json={"text": text, "layer": 1, "quantity": "f", "cells": [1, 2]}
            ).json()
            close(unpack(d["values"]), analyze(model, text).values("f", 1)[:, [1, 2]])
            t = unpack(d["target_prob"])
            np.testing.assert_allclose(t[:-1], analyze(model, text).target_prob[:-1], atol=1e-4)
    assert cache.hits - hits >= 2 * (250 // cache.chunk)  # the shared 250 tokens, twice


def test_prefix_cache_matches_a_full_pass_and_stays_within_its_budget(model):
    text = (STORY * 3)[:500]
    ids = model.tokenizer.encode(text)
    a = analyze(model, text, top_k=3)
    cache = PrefixCache(model, max_bytes=10**9, chunk=16)
    for _ in range(2):  # computed, then reused
        run = cache.run(ids)
        for q in QUANTITIES:
            for layer in (0, 1):
                close(run.values(q, layer), a.values(q, layer))
        g_ids, g_p = run.guesses()
        assert [model.tokenizer.decode([i]) for i in g_ids[:, 0]] == [t[0][0] for t in a.top]
        np.testing.assert_allclose(run.target_prob()[:-1], a.target_prob[:-1], atol=1e-5)
        np.testing.assert_allclose(
            run.next_probs(),
            torch.softmax(model(torch.tensor([ids]))[0][0, -1], -1).detach().numpy(),
            atol=1e-5,
        )
    assert cache.hits == (len(ids) - 1) // 16 and len(cache) == (len(ids) - 1) // 16
    one = cache.nbytes // len(cache)  # every stored chunk is a whole one: all the same size
    small = PrefixCache(model, max_bytes=3 * one, chunk=16)
    small.run(ids)
    assert len(small) == 3 and small.nbytes <= 3 * one  # the oldest went first
    other = PrefixCache(model, max_bytes=10**9, chunk=16)
    other.run(ids)
    other.run(model.tokenizer.encode("D" + text[1:]))  # same tokens after the first: no reuse
    assert other.hits == 0


def test_texts_that_arrive_together_share_forward_passes(model):
    """Requests that wait for the model while a pass runs are run together, each from its own
    stored state and of its own length, with the values of separate passes."""
    base = (STORY * 3)[:300]
    texts = [base[:250] + t for t in ("Dan", "Bob can swim.", "He", "For his", "e")]
    texts += [STORY[22:67], STORY[22:62]]  # beginnings not stored: run from scratch
    cache = PrefixCache(model, max_bytes=10**9, chunk=16)
    cache.run(model.tokenizer.encode(base))  # the shared beginning, stored
    passes = cache.passes
    runs = {}
    with cache.model_lock:  # a pass "running": every request queues up behind it
        threads = [
            threading.Thread(
                target=lambda t=t: runs.update({t: cache.run(model.tokenizer.encode(t))})
            )
            for t in texts
        ]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 60
        while cache.waiting < len(texts) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache.waiting == len(texts)  # else a request failed before reaching the model
    for th in threads:
        th.join()
    # one pass for the five tails after the stored beginning (5-23 tokens), one for the two
    # texts run from scratch (40-45 tokens: too long to pad the tails to)
    assert cache.passes - passes == 2
    for t in texts:
        a = analyze(model, t, top_k=3)
        for q in ("f", "c", "h"):
            close(runs[t].values(q, 1), a.values(q, 1))
        np.testing.assert_allclose(runs[t].target_prob()[:-1], a.target_prob[:-1], atol=1e-4)
        assert np.isnan(runs[t].target_prob()[-1])


def test_a_failed_batched_pass_is_reported_to_every_request_in_it(model, monkeypatch):
    """A pass that fails fails each request that waited for it (none waits forever, none gets
    another's values); the cache keeps nothing of it and the next pass runs normally."""
    cache = PrefixCache(model, max_bytes=10**9, chunk=16)
    texts = ["Bob is a nice person.", "Dan is evil.", "He served."]
    errors: dict[str, BaseException] = {}

    def ask(t):
        try:
            cache.run(model.tokenizer.encode(t))
        except RuntimeError as e:
            errors[t] = e

    def broken(jobs):
        raise RuntimeError(f"a pass over {len(jobs)} texts failed")

    monkeypatch.setattr(cache, "_forward", broken)
    with cache.model_lock:
        threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 60
        while cache.waiting < len(texts) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache.waiting == len(texts)
    for th in threads:
        th.join(60)
    assert sorted(errors) == sorted(texts)
    assert all("a pass over 3 texts failed" in str(e) for e in errors.values())
    assert len(cache) == 0 and cache.waiting == 0
    monkeypatch.undo()
    run = cache.run(model.tokenizer.encode(texts[0]))
    close(run.values("h", 0), analyze(model, texts[0], top_k=1).values("h", 0))


def test_characters_outside_the_vocabulary_are_the_unknown_symbol(client):
    r = client.post("/api/analyze", json={"text": "Bob Zoë"})
    assert r.status_code == 200, r.text
    vocab = client.get("/api/info").json()["vocab"]
    tokens = [vocab[i] for i in unpack(r.json()["token_ids"])]
    assert tokens == ["B", "o", "b", " ", "\ufffd", "o", "\ufffd"]


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/api/analyze", {"text": ""}, 400, ["empty"]),
        ("/api/analyze", {"text": 3}, 400, ["'text'"]),
        ("/api/analyze", {"text": "Bob", "layer": 2}, 400, ["'layer'", "0..1"]),
        ("/api/analyze", {"text": "Bob", "quantity": "x"}, 400, ["'quantity'"]),
        ("/api/analyze", {"text": "Bob", "cells": [32]}, 400, ["'cells'", "0..31"]),
        ("/api/analyze", {"text": "Bob", "cells": []}, 400, ["'cells'"]),
        ("/api/analyze", {"text": "Bob", "top_k": 0}, 400, ["'top_k'"]),
        ("/api/cells_on", {"text": "Bob", "start": 2, "end": 2}, 400, ["'end'", "3..3"]),
        (
            "/api/cells_on",
            {"text": "Bob", "start": 0, "end": 1, "threshold": "hi"},
            400,
            ["threshold"],
        ),
        (
            "/api/cells_on",
            {"text": "Bob", "start": 0, "end": 1, "quantity": "f"},
            400,
            ["'quantity'"],
        ),
        (
            "/api/match",
            {"text": "Bob", "start": 0, "end": 3, "threshold": 5},
            400,
            ["no cell", "lower"],
        ),
        ("/api/match", {"cells": [99]}, 400, ["'cells'", "0..31"]),
        ("/api/match", {"cells": [1], "tolerance": -1}, 400, ["'tolerance'"]),
    ],
)
def test_bad_requests_get_one_clear_message(client, path, body, status, words):
    assert_clean_error(client.post(path, json=body), status, *words)


def test_text_over_the_cap_and_outside_the_vocabulary(client):
    assert_clean_error(
        client.post("/api/analyze", json={"text": "Bob " * 120}), 413, "480", "at most 400"
    )
    r = client.post("/api/analyze", json={"text": "Bob Zoë"})
    assert_clean_error(r, 400, "not in the vocabulary", "'Z'", "'ë'")


def test_a_crash_is_a_message_not_a_traceback(tiny_run, monkeypatch):
    app = create_app(tiny_run, val_text=STORY)
    monkeypatch.setattr(
        app.state.inspector,
        "_run",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom at secret.py")),
    )
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        r = c.post("/api/analyze", json={"text": "Bob"})
    assert_clean_error(r, 500, "internal error", "RuntimeError", "server's log")
    assert "boom" not in r.text
    for k, v in SECURITY_HEADERS.items():
        assert r.headers[k] == v


# ------------------------------------------------------------------ who may talk to it
def test_a_foreign_host_is_refused(client):
    """DNS rebinding: a page of evil.example.com whose name now points at 127.0.0.1 sends
    requests with its own name as the Host."""
    for method, path in (("GET", "/"), ("GET", "/api/info"), ("POST", "/api/analyze")):
        r = client.request(method, path, json={"text": "Bob"}, headers={"host": "evil.example.com"})
        assert r.status_code == 400 and "host" in r.text.lower()
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200


def test_a_foreign_origin_is_refused(client):
    for origin in ("http://evil.example.com", "null", "http://127.0.0.1:9999"):
        r = client.post("/api/analyze", json={"text": "Bob"}, headers={"origin": origin})
        assert_clean_error(r, 403, "refused", origin)
        assert client.get("/api/info", headers={"origin": origin}).status_code == 403
    same = client.post(
        "/api/analyze",
        json={"text": "Bob"},
        headers={"origin": "http://127.0.0.1:8000", "host": "127.0.0.1:8000"},
    )
    assert same.status_code == 200
    assert client.post("/api/analyze", json={"text": "Bob"}).status_code == 200  # no Origin


def test_posts_must_be_json(client):
    for headers in (
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},
        {},
    ):
        r = client.post("/api/analyze", content=b'{"text": "Bob"}', headers=headers)
        assert_clean_error(r, 415, "application/json")
    ok = client.post(
        "/api/analyze",
        content=b'{"text": "Bob"}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


def test_every_response_carries_the_security_headers(client):
    for r in (
        client.get("/"),
        client.get("/static/app.js"),
        client.get("/api/info"),
        client.post("/api/analyze", json={"text": ""}),
        client.get("/api/nothing"),
        client.get("/api/info", headers={"host": "evil.example.com"}),
    ):
        for k, v in SECURITY_HEADERS.items():
            assert r.headers.get(k) == v, (r.url, k)
    assert "frame-ancestors 'none'" in SECURITY_HEADERS["content-security-policy"]
    assert "script-src 'self'" in SECURITY_HEADERS["content-security-policy"]
    assert client.get("/api/info").headers["cache-control"] == "no-store"


def test_parse_limits_are_400s_not_500s(client):
    deep = client.post(
        "/api/analyze", content=b"[" * 20_000, headers={"content-type": "application/json"}
    )
    assert_clean_error(deep, 400, "nests deeper")
    deep_obj = client.post(
        "/api/analyze",
        content=b'{"text": "Bob", "x": ' + b"[" * 100 + b"]" * 100 + b"}",
        headers={"content-type": "application/json"},
    )
    assert_clean_error(deep_obj, 400, "nests deeper")
    big = client.post(
        "/api/analyze",
        content=b'{"text": "' + b"a" * 200_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_clean_error(big, 413, "too large")
    huge_int = client.post(
        "/api/analyze",
        content=b'{"text": "Bob", "layer": ' + b"9" * 10_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert huge_int.status_code == 400
    for bad, words in ((b"{not json", ["JSON"]), (b"[1, 2]", ["object"])):
        r = client.post("/api/analyze", content=bad, headers={"content-type": "application/json"})
        assert_clean_error(r, 400, *words)
    assert_clean_error(client.get("/api/nothing"), 404)
    assert_clean_error(client.get("/api/analyze"), 405)


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'{"text": "[[[[{{{{", "a": [1, [2]]}') == 3
    assert json_depth(b'{"text": "say \\"[[[\\" twice"}') == 1
    assert json_depth(b"[" * 50) == 50
    assert json_depth(b"") == 0


# ------------------------------------------------------------------ cells on, and matches
def test_cells_on_are_above_threshold_across_the_whole_span(client, model):
    start, end, threshold = 4, 11, 0.2
    body = {"text": TEXT, "layer": 1, "start": start, "end": end, "threshold": threshold}
    d = client.post("/api/cells_on", json=body).json()
    h = analyze(model, TEXT).values("h", 1)
    lo = h[start:end].min(0)
    clear = np.abs(lo - threshold) > F16  # cells whose minimum is not within rounding of it
    expected = {k for k in range(h.shape[1]) if lo[k] > threshold}
    assert expected and expected != set(range(h.shape[1])), "some cells on, some off"
    got = {c["cell"] for c in d["cells"]}
    assert {k for k in got if clear[k]} == {k for k in expected if clear[k]}
    for c in d["cells"]:
        assert c["min"] == pytest.approx(lo[c["cell"]], abs=F16) and c["min"] > threshold
    mins = [c["min"] for c in d["cells"]]
    assert mins == sorted(mins, reverse=True)
    assert d["span"] == TEXT[start:end] and (d["start"], d["end"]) == (start, end)


def test_match_by_default_uses_the_spans_most_distinctive_cells_with_a_tolerance(tiny_run, model):
    text = STORY * 2
    app = create_app(tiny_run, max_chars=len(text), val_text=text)
    tries = [
        (word, k, t)
        for word in ("brave Bob", "brave", "Bob", ",", ".")
        for k in (1, 0)
        for t in (0.5, 0.3, 0.2, 0.1)
    ]
    with TestClient(app, base_url=BASE) as c:
        for word, layer, threshold in tries:  # a span this small model singles out
            start = text.index(word)
            end = start + len(word)
            span = {"text": text, "start": start, "end": end, "top": 100}
            r = c.post("/api/match", json={**span, "layer": layer, "threshold": threshold})
            if r.status_code == 200:
                break
            assert_clean_error(r, 400, "threshold")  # none on, or none distinctive: say so
        else:
            pytest.fail("the model singles out none of the spans tried")
    d = r.json()
    h = analyze(model, text).values("h", layer)
    on = [k for k in range(h.shape[1]) if (h[start:end, k] > threshold).all()]
    frac = {k: (h[:, k] > threshold).mean() for k in on}
    distinctive = [k for k in on if frac[k] < 0.5]
    # the pattern: the on-cells that are on least often in the match text (and under half)
    assert d["cells_on_span"] == len(on) and len(d["cells"]) == min(5, len(distinctive))
    assert [p["cell"] for p in d["pattern"]] == d["cells"]
    assert all(frac[k] < 0.5 + F16 for k in d["cells"])
    others = [frac[k] for k in on if k not in d["cells"]]
    assert max(frac[k] for k in d["cells"]) <= min(others + [1.0]) + F16
    assert d["tolerance"] == min(1, len(d["cells"]) - 1)
    assert d["need"] == len(d["cells"]) - d["tolerance"]
    assert d["source"] == "the given text" and d["length"] == end - start
    hits = [m for m in d["matches"] if m["start"] <= start and m["end"] >= end]
    assert len(hits) == 1  # the span itself is found
    m = hits[0]
    assert m["span"] == text[m["start"] : m["end"]] or m["span_cut"]
    assert m["before"] == text[max(0, m["start"] - 40) : m["start"]]
    for m in d["matches"]:  # at least `need` of the cells on at every step of every match
        counts = (h[m["start"] : m["end"], d["cells"]] > threshold).sum(1)
        assert (counts >= d["need"] - 1).all()  # (float16 rounding may tip one cell)
        assert 0 < m["score"] <= 1
    scores = [m["score"] for m in d["matches"]]
    assert scores == sorted(scores, reverse=True)


def test_match_says_when_no_on_cell_is_distinctive(tiny_run):
    app = create_app(tiny_run, val_text=STORY)
    insp = app.state.inspector
    h = insp.match_text().gates["h"][1]
    always = int(np.argmax((h > 0.0).mean(0)))  # the cell on most often
    threshold = float(h[:, always].min()) - 0.01  # it, and maybe others, on everywhere
    on = (h > threshold).mean(0)
    assert on[always] == 1.0
    body = {"text": STORY, "layer": 1, "start": 0, "end": len(STORY), "threshold": threshold}
    with TestClient(app, base_url=BASE) as c:
        r = c.post("/api/match", json=body)
    assert_clean_error(r, 400, "single out nothing", "raise the threshold")


@pytest.mark.slow
def test_match_finds_other_spans_on_the_stories_corpus(stories_run):
    """With the defaults (threshold 0.5, the 5 most distinctive cells, tolerance 1), a token of
    the article's passage -- the full stop before the subject switch, the comma after "Dan" --
    finds other places of the stories' validation split where its pattern is on."""
    app = create_app(stories_run)
    insp = app.state.inspector
    ex = insp.example()
    model = insp.model
    found = 0
    with TestClient(app, base_url=BASE) as c:
        for where in ("evil.", "Dan,"):
            t = ex.index(where) + len(where) - 1  # char level: token = character
            for layer in (0, 1):
                body = {"text": ex, "layer": layer, "start": t, "end": t + 1}
                r = c.post("/api/match", json=body)
                if r.status_code != 200:  # "raise the threshold" / "no cell": a clear message
                    assert_clean_error(r, 400, "threshold")
                    continue
                d = r.json()
                assert d["source"] == "the validation split of stories"
                assert d["threshold"] == 0.5 and d["tolerance"] == min(1, len(d["cells"]) - 1)
                h = analyze(model, insp.match_text().text).values("h", layer)
                for m in d["matches"]:
                    counts = (h[m["start"] : m["end"], d["cells"]] > 0.5).sum(1)
                    assert (counts >= d["need"] - 1).all()  # float16 may tip one cell
                    assert max(p["on_fraction"] for p in d["pattern"]) < 0.5
                found += len(d["matches"])
    assert found > 0


def test_find_matches_with_and_without_tolerance():
    v = np.zeros((14, 3))
    v[1:4, 0] = 1  # cell 0 alone, length 3
    v[6:8, :] = 1  # all cells, length 2
    v[9:12, 0:2] = 1  # cells 0 and 1, length 3
    exact = find_matches(v, [0, 1], 0.5, 3)
    assert [(m["start"], m["end"], m["score"]) for m in exact] == [(9, 12, 1.0), (6, 8, 0.6667)]
    loose = find_matches(v, [0, 1], 0.5, 3, tolerance=1)  # one of the two cells is enough
    assert [(m["start"], m["end"], m["score"]) for m in loose] == [
        (9, 12, 1.0),
        (6, 8, 0.6667),
        (1, 4, 0.5),  # the right length, but half the cells on
    ]
    assert loose[2]["coverage"] == 0.5
    assert find_matches(v, [0, 1], 0.5, 3, top=1) == exact[:1]
    assert find_matches(v, [0, 2], 2.0, 3, tolerance=1) == []
    assert [c["cell"] for c in cells_on(v, 9, 12, 0.5)] == [0, 1]


def test_pattern_cells_are_the_rarely_on_ones():
    v = np.zeros((10, 4))
    v[:, 0] = 1  # always on
    v[:2, 1] = 1  # on 20% of the time
    v[:5, 2] = 1  # 50%
    got = pattern_cells(v, [0, 1, 2], 0.5, 2)
    assert got == [{"cell": 1, "on_fraction": 0.2}, {"cell": 2, "on_fraction": 0.5}]
    assert pattern_cells(v, [], 0.5, 2) == []


def test_informative_cells_rank_what_a_cell_remembers():
    rng = np.random.default_rng(0)
    T = 4000
    ids = rng.integers(0, 6, T)
    h = rng.normal(size=(T, 4)) * 0.1
    h[:, 0] = ids  # echoes the current token: tells nothing the token does not
    h[:-1, 1] = ids[1:]  # knows the next token: all of it
    h[:, 2] = 0.5  # never moves
    ranked = informative_cells(h, ids)
    assert [c["cell"] for c in ranked][:1] == [1]
    bits = {c["cell"]: c["bits"] for c in ranked}
    assert bits[1] > 1.0  # log2(4 bins) = 2 bits at most; 6 tokens in 4 bins
    assert bits[2] == 0.0
    assert bits[0] < 0.05 and bits[3] < 0.05  # plug-in bias only
    assert informative_cells(h, ids, top=2) == ranked[:2]
    with pytest.raises(ValueError):
        informative_cells(h[:1], ids[:1])


def test_match_text_outside_the_vocabulary_is_searched_as_unknown(tiny_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Zoë and Xavier\n" * 5, encoding="utf-8")
    with TestClient(create_app(tiny_run, data=str(other))) as c:
        r = c.post("/api/match", json={"text": TEXT, "start": 0, "end": 3, "threshold": -2})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["matches"], list)


def test_a_split_file_run_searches_its_validation_file(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    train_file, valid_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text(STORY)
    valid_file.write_text("Dan is evil.\n")
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"].update(data=None, train=str(train_file), valid=str(valid_file))
    (run / "config.json").write_text(json.dumps(cfg))
    text, what = match_source(run)()
    assert text == "Dan is evil.\n" and "validation split" in what


def test_colour_scale_is_centred_and_clipped_at_robust_percentiles():
    v = np.concatenate([np.linspace(-0.4, 0.4, 995), [5.0] * 5])  # 0.5% outliers
    s = colour_scale(v, "c")
    assert s["centre"] == 0.0 and s["min"] == -s["max"]
    p1, p99 = np.percentile(v, [1, 99])
    assert s["half"] == pytest.approx(max(-p1, p99), abs=1e-6) and s["half"] < 0.4
    assert s["clipped"] == pytest.approx(np.mean(np.abs(v) > s["half"]), abs=1e-6)
    assert 0.005 < s["clipped"] < 0.02  # the outliers, and the very ends of the rest
    g = colour_scale(np.linspace(0.45, 0.52, 100), "f")
    assert g["centre"] == 0.5 and g["half"] == pytest.approx(0.0493, abs=0.001)
    assert colour_scale(np.array([0.0, 1.0, 1.0]), "o")["half"] == 0.5  # never past [0, 1]
    assert colour_scale(np.zeros(5), "h")["half"] == 1.0  # all at the centre: the full range


# ------------------------------------------------------------------ the command
def test_serve_parser_defaults_to_this_machine_only():
    args = build_parser().parse_args(["serve", "RUN"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_chars == 2000
    assert args.cache_mb == 512 and args.allow_host == [] and args.threads == 1
    args = build_parser().parse_args(["serve", "RUN", "--host", "0.0.0.0", "--port", "9"])
    assert args.host == "0.0.0.0" and args.port == 9


@pytest.fixture
def no_server(monkeypatch):
    """uvicorn.Server.run replaced: records the socket and the app instead of serving."""
    import uvicorn

    seen = {}

    def fake_run(self, sockets):
        seen["addr"] = sockets[0].getsockname()
        seen["app"] = self.config.app

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    return seen


@pytest.mark.slow
def test_serve_binds_loopback_and_prints_the_url(stories_run, no_server, capsys):
    assert main(["serve", str(stories_run), "--port", "0"]) == 0
    host, port = no_server["addr"][:2]
    assert host == "127.0.0.1" and port > 0
    out = capsys.readouterr()
    assert f"http://127.0.0.1:{port}/" in out.out and "warning" not in out.err
    insp = no_server["app"].state.inspector
    assert insp.max_chars == 2000 and insp.cache.max_bytes == 512 * 2**20
    assert torch.get_num_threads() == 1
    assert insp.match_error is None and len(insp.cache) > 0  # warmed before the URL


@pytest.mark.slow
def test_serve_beyond_loopback_warns_and_answers_to_this_machines_names(
    stories_run, no_server, capsys
):
    assert main(["serve", str(stories_run), "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on every network interface" in err
    assert "no password" in err and "--allow-host" in err and "Traceback" not in err
    name = socket.gethostname().lower()
    with TestClient(no_server["app"], base_url=BASE) as c:
        assert c.get("/api/info", headers={"host": f"{name}:8000"}).status_code == 200
        assert c.get("/api/info", headers={"host": "evil.example.com"}).status_code == 400


def test_allowed_hosts_follow_the_host_option(tiny_run):
    from glasslstm.commands.serve import allowed_hosts

    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts("192.168.1.5", ["Lab.example"]) == [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "192.168.1.5",
        "lab.example",
    ]
    assert "[fe80::1]" in allowed_hosts("fe80::1")
    assert socket.gethostname().lower() in allowed_hosts("0.0.0.0")
    app = create_app(tiny_run, val_text=STORY, allowed_hosts=allowed_hosts("::", ["lab.example"]))
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/api/info", headers={"host": "lab.example:8000"}).status_code == 200
        assert c.get("/api/info", headers={"host": "evil.example.com"}).status_code == 400


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-chars", "0"], "--max-chars must be >= 1"),
        (["--cache-mb", "-1"], "--cache-mb must be >= 0"),
        (["--threads", "0"], "--threads must be in 1..1024"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--host", "no such host.invalid"], "cannot listen on"),
    ],
)
def test_serve_user_errors_are_one_line(tiny_run, capsys, args, message):
    assert main(["serve", str(tiny_run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_serve_port_in_use_is_one_line(tiny_run, capsys):
    from glasslstm.commands.serve import listen

    taken = listen("127.0.0.1", 0)
    try:
        assert main(["serve", str(tiny_run), "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1:" in err and "another --port" in err


def _broken(run, tmp_path, how):
    """A copy of the run directory ``run``, broken in one way."""
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / f"broken-{how}"
    if how == "missing":
        return bad
    if how == "file":
        bad.write_text("not a run")
        return bad
    shutil.copytree(run, bad)
    shutil.rmtree(bad / "best", ignore_errors=True)
    cfg = json.loads((bad / "config.json").read_text())
    if how == "config-not-json":
        (bad / "config.json").write_text("{nope")
    elif how == "config-wrong-type":
        cfg["model"]["hidden_size"] = "abc"
        (bad / "config.json").write_text(json.dumps(cfg))
    elif how == "config-deep":
        (bad / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    elif how == "weights-wrong-shape":
        save_file({"embedding.weight": torch.zeros(3, 3)}, str(bad / "model.safetensors"))
    elif how == "weights-garbage":
        (bad / "model.safetensors").write_bytes(b"\x00garbage")
    elif how == "vocab-missing":
        (bad / "vocab.json").unlink()
    elif how == "vocab-wrong":
        (bad / "vocab.json").write_text(json.dumps({"level": "char"}))
    return bad


@pytest.mark.parametrize(
    "how",
    [
        "missing",
        "file",
        "config-not-json",
        "config-wrong-type",
        "config-deep",
        "weights-wrong-shape",
        "weights-garbage",
        "vocab-missing",
        "vocab-wrong",
    ],
)
def test_serve_on_a_broken_run_directory_is_one_line(tiny_run, tmp_path, capsys, how):
    bad = _broken(tiny_run, tmp_path, how)
    assert main(["serve", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glasslstm serve: error: ") and err.count("\n") == 1, err
    assert str(bad) in err and "Traceback" not in err


def test_serve_with_unreadable_match_data(tiny_run, tmp_path, no_server, capsys):
    missing = tmp_path / "gone.txt"
    assert main(["serve", str(tiny_run), "--port", "0", "--data", "no-such-corpus-x"]) == 2
    err = capsys.readouterr().err
    assert "--data no-such-corpus-x" in err and err.count("\n") == 1
    # the run's own corpus unreadable: the inspector still serves, without the match view
    cfg = json.loads((tiny_run / "config.json").read_text())
    moved = tmp_path / "moved-run"
    import shutil

    shutil.copytree(tiny_run, moved)
    cfg["train"]["data"] = str(missing)
    (moved / "config.json").write_text(json.dumps(cfg))
    assert main(["serve", str(moved), "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: the match view is off" in err and err.count("\n") == 1
    info = TestClient(no_server["app"], base_url=BASE).get("/api/info").json()
    assert info["match"] is False and "match view is off" in info["match_error"]
    assert info["example"] and info["informative"]["source"] == "the example text"


@pytest.mark.slow
def test_the_load_benchmark_runs_pages_against_a_served_model(stories_run, tmp_path, capsys):
    """python -m glasslstm.bench.serve_load: a real `glasslstm serve` in a child process, pages
    in threads; the figures it prints are also in its JSON."""
    from glasslstm.bench import serve_load

    out = tmp_path / "load.json"
    args = [str(stories_run), "--clients", "2", "--requests", "3", "--chars", "300"]
    assert serve_load.main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["command"] == "python -m glasslstm.bench.serve_load " + " ".join(
        [*args, "--json", str(out)]
    )
    assert [r["mode"] for r in d["results"]] == ["typing", "cold"]
    for r in d["results"]:
        assert r["clients"] == 2 and r["requests"] == 6 and r["errors"] == 0
        assert 0 < r["median_s"] <= r["p90_s"] <= r["max_s"]
        assert 0 < r["response_bytes_max"] < 2**20
        assert r["server_cpu_ms_per_request"] > 0
        assert f"{r['mode']:<7} {r['clients']:>7} {r['requests']:>8} {0:>6}" in printed


def test_the_inspector_can_serve_the_int8_model(tiny_run):
    """serve --quantize int8: the page's figures are those of the int8-rounded model."""
    from glasslstm.quantize import quantize

    app8 = create_app(tiny_run, max_chars=400, val_text=STORY * 2, quantize="int8")
    inspector = app8.state.inspector
    assert inspector.model.quantized == "int8"
    rounded = quantize(LanguageModel.load(tiny_run), "int8")
    for name, w in rounded.state_dict().items():
        assert torch.equal(inspector.model.state_dict()[name], w), name

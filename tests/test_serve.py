"""The web inspector's API (glasslstm.inspection.server) through Starlette's test client, and the
`glasslstm serve` command's parser and start-up."""

import json
import shutil

import numpy as np
import pytest
from starlette.testclient import TestClient

from conftest import STORY
from glasslstm.cli import build_parser, main
from glasslstm.inspection import analyze
from glasslstm.inspection.server import cells_on, create_app, find_matches, match_source
from glasslstm.model import LanguageModel

TEXT = 'Bob is a nice person. "Run," said Bob.'


@pytest.fixture(scope="module")
def model(tiny_run):
    return LanguageModel.load(tiny_run)


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(create_app(tiny_run, max_chars=200, val_text=STORY * 2)) as c:
        yield c


def assert_clean_error(resp, status, *words):
    """An error reply: the status, one JSON message naming the problem, no traceback."""
    assert resp.status_code == status, resp.text
    msg = resp.json()["error"]
    assert isinstance(msg, str) and msg
    for w in words:
        assert w in msg
    for leak in ("Traceback", 'File "', "line ", ".py"):
        assert leak not in resp.text


def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element in (
        'id="text"',
        'id="next"',
        'id="gates"',
        'id="threshold"',
        'id="cells-on"',
        'id="cells"',
        'id="match"',
        'id="matches"',
        'id="error"',
    ):
        assert element in page.text
    assert "analyze" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200


def test_info_describes_the_model(client, model):
    info = client.get("/api/info").json()
    assert info["num_layers"] == model.config.num_layers == 2
    assert info["hidden_size"] == model.config.hidden_size == 32
    assert info["level"] == "char" and info["max_chars"] == 200 and info["match"] is True


def test_analyze_shapes_agree_with_analyze(client, model):
    r = client.post("/api/analyze", json={"text": TEXT, "layer": 1, "top_k": 4})
    assert r.status_code == 200, r.text
    d = r.json()
    a = analyze(model, TEXT, top_k=4)
    T, H = len(TEXT), model.config.hidden_size
    assert d["tokens"] == a.tokens and len(d["tokens"]) == T and d["text"] == TEXT
    assert set(d["gates"]) == set("ifgoch")
    for q, rows in d["gates"].items():
        arr = np.array(rows)
        assert arr.shape == (T, H)
        np.testing.assert_allclose(arr, a.values(q, 1), atol=1e-4)
    assert len(d["top"]) == T and all(len(row) == 4 for row in d["top"])
    assert d["next"] == d["top"][-1]
    assert [n["token"] for n in d["next"]] == [t for t, _ in a.top[-1]]
    probs = [n["prob"] for n in d["next"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert len(d["target_prob"]) == T and d["target_prob"][-1] is None


def test_analyze_sends_only_the_quantities_asked_for(client):
    d = client.post("/api/analyze", json={"text": "Bob", "quantities": ["f"]}).json()
    assert list(d["gates"]) == ["f"] and d["layer"] == 0
    assert all(0 <= v <= 1 for row in d["gates"]["f"] for v in row)


def test_text_over_the_cap_is_refused_with_a_clear_message(client):
    r = client.post("/api/analyze", json={"text": "Bob " * 60})
    assert_clean_error(r, 413, "240", "at most 200", "--max-chars")


def test_oversized_body_is_refused_before_parsing(client):
    r = client.post(
        "/api/analyze",
        content=b'{"text": "' + b"a" * 200_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_clean_error(r, 413, "too large")


def test_characters_outside_the_vocabulary_are_the_unknown_symbol(client):
    r = client.post("/api/analyze", json={"text": "Bob Zoë"})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == ["B", "o", "b", " ", "\ufffd", "o", "\ufffd"]


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/api/analyze", {"text": ""}, 400, ["empty"]),
        ("/api/analyze", {"text": 3}, 400, ["'text'"]),
        ("/api/analyze", {"text": "Bob", "layer": 2}, 400, ["'layer'", "0..1"]),
        ("/api/analyze", {"text": "Bob", "quantities": ["x"]}, 400, ["'quantities'"]),
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
    ],
)
def test_bad_requests_get_one_clear_message(client, path, body, status, words):
    assert_clean_error(client.post(path, json=body), status, *words)


def test_malformed_json_unknown_route_and_wrong_method(client):
    assert_clean_error(
        client.post(
            "/api/analyze", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
        "JSON",
    )
    assert_clean_error(client.post("/api/analyze", json=[1, 2]), 400, "object")
    assert_clean_error(client.get("/api/nothing"), 404)
    assert_clean_error(client.get("/api/analyze"), 405)


def test_a_crash_is_a_message_not_a_traceback(tiny_run, monkeypatch):
    app = create_app(tiny_run)
    monkeypatch.setattr(
        app.state.inspector,
        "_analyze",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom at secret.py")),
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/api/analyze", json={"text": "Bob"})
    assert_clean_error(r, 500, "internal error", "RuntimeError", "server's log")
    assert "boom" not in r.text


def test_cells_on_are_above_threshold_across_the_whole_span(client, model):
    start, end, threshold = 4, 11, 0.2
    body = {"text": TEXT, "layer": 1, "start": start, "end": end, "threshold": threshold}
    d = client.post("/api/cells_on", json=body).json()
    h = analyze(model, TEXT).values("h", 1)
    expected = {k for k in range(h.shape[1]) if (h[start:end, k] > threshold).all()}
    assert expected, "pick a span/threshold where some cell is on"
    assert {c["cell"] for c in d["cells"]} == expected
    assert expected != set(range(h.shape[1])), "and some cell is off"
    for c in d["cells"]:
        assert c["min"] == pytest.approx(h[start:end, c["cell"]].min(), abs=1e-4)
        assert c["min"] > threshold
    mins = [c["min"] for c in d["cells"]]
    assert mins == sorted(mins, reverse=True)
    assert d["span"] == TEXT[start:end] and (d["start"], d["end"]) == (start, end)
    c_on = client.post("/api/cells_on", json={**body, "quantity": "c"}).json()
    c = analyze(model, TEXT).values("c", 1)
    assert {x["cell"] for x in c_on["cells"]} == {
        k for k in range(c.shape[1]) if (c[start:end, k] > threshold).all()
    }


def test_match_finds_the_span_itself_in_the_same_text(tiny_run, model):
    text = STORY * 2
    app = create_app(tiny_run, max_chars=len(text), val_text=text)
    start = text.index("brave Bob")
    end = start + len("brave Bob")
    with TestClient(app) as c:
        d = c.post(
            "/api/match",
            json={
                "text": text,
                "layer": 1,
                "start": start,
                "end": end,
                "threshold": 0.2,
                "top": 100,
            },
        ).json()
    assert d["cells"] and d["searched_tokens"] == len(text) and not d["searched_truncated"]
    assert d["source"] == "the given text" and d["length"] == end - start
    hits = [m for m in d["matches"] if m["start"] <= start and m["end"] >= end]
    assert len(hits) == 1
    m = hits[0]
    assert text[start:end] in m["span"] and m["span"] == text[m["start"] : m["end"]]
    assert m["before"] == text[max(0, m["start"] - 40) : m["start"]]
    # every match really has all the cells on, all the way through
    h = analyze(model, text).values("h", 1)
    for m in d["matches"]:
        assert (h[m["start"] : m["end"], d["cells"]] > 0.2).all()
    scores = [m["score"] for m in d["matches"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)


def test_find_matches_ranks_by_length_and_precision():
    v = np.zeros((12, 3))
    v[1:4, 0] = 1  # cell 0 alone, length 3: the perfect match for length 3
    v[6:8, :] = 1  # all cells, length 2: shorter and not precise
    v[9:12, 0:2] = 1  # cells 0 and 1, length 3
    got = find_matches(v, [0], 0.5, 3)
    assert [(m["start"], m["end"]) for m in got] == [(1, 4), (9, 12), (6, 8)]
    assert [m["score"] for m in got] == [1.0, 0.5, round(2 / 3 / 3, 4)]
    assert find_matches(v, [0], 0.5, 3, top=1) == got[:1]
    assert find_matches(v, [0, 2], 2.0, 3) == []
    assert [c["cell"] for c in cells_on(v, 9, 12, 0.5)] == [0, 1]


def test_match_without_a_text_to_search(model):
    with TestClient(create_app(model)) as c:
        assert c.get("/api/info").json()["match"] is False
        r = c.post("/api/match", json={"text": TEXT, "start": 0, "end": 3, "threshold": -2})
    assert_clean_error(r, 400, "no text to search", "--data")


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


def test_serve_parser_defaults_to_this_machine_only():
    args = build_parser().parse_args(["serve", "RUN"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_chars == 2000
    args = build_parser().parse_args(["serve", "RUN", "--host", "0.0.0.0", "--port", "9"])
    assert args.host == "0.0.0.0" and args.port == 9


def test_serve_binds_loopback_and_prints_the_url(tiny_run, monkeypatch, capsys):
    import uvicorn

    seen = {}

    def fake_run(self, sockets):
        seen["addr"] = sockets[0].getsockname()
        seen["app"] = self.config.app

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert main(["serve", str(tiny_run), "--port", "0"]) == 0
    host, port = seen["addr"][:2]
    assert host == "127.0.0.1" and port > 0
    assert f"http://127.0.0.1:{port}/" in capsys.readouterr().out
    assert seen["app"].state.inspector.max_chars == 2000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-chars", "0"], "--max-chars must be >= 1"),
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

"""glasslstm inspect: the trace is what the model computed; the terminal, JSON, HTML and PNG
views show it; user errors are one line with exit status 2."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from glasslstm.cli import main
from glasslstm.inspection import Analysis, analyze
from glasslstm.inspection.common import default_scale, rgb, scale_for
from glasslstm.inspection.html import render_html
from glasslstm.inspection.pictures import plot_png
from glasslstm.inspection.terminal import _ansi256, render, resolve
from glasslstm.model import LanguageModel

TEXT = 'Bob is a nice person. Dan, on the other hand, is evil. "Run," said Bob.\nBob can swim.'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model(tiny_run):
    return LanguageModel.load(tiny_run)


@pytest.fixture(scope="module")
def analysis(model):
    return analyze(model, TEXT, top_k=3)


def fake_analysis(tokens: list[str], layers: int = 2, size: int = 8, seed: int = 0) -> Analysis:
    """An Analysis that obeys the cell equations, without a model (for views only)."""
    rng = np.random.default_rng(seed)
    T = len(tokens)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    g = {q: sig(rng.normal(size=(layers, T, size))) for q in "ifo"}
    g["g"] = np.tanh(rng.normal(size=(layers, T, size)))
    c = np.zeros((layers, T, size))
    for t in range(T):
        c[:, t] = g["f"][:, t] * (c[:, t - 1] if t else 0) + g["i"][:, t] * g["g"][:, t]
    g["c"], g["h"] = c, g["o"] * np.tanh(c)
    top = [[("e", 0.5), (" ", 0.25), ("</", 0.125)] for _ in range(T)]
    return Analysis(
        text="".join(tokens),
        tokens=tokens,
        token_ids=list(range(T)),
        level="char",
        gates={q: a.astype(np.float32) for q, a in g.items()},
        top=top,
        target_prob=np.r_[np.full(T - 1, 0.25), np.nan],
    )


# --------------------------------------------------------------------------- the trace


def test_trace_obeys_the_cell_equations(analysis):
    """C_t = f_t * C_{t-1} + i_t * N_t from C_{-1} = 0, and H_t = o_t * tanh(C_t), per layer."""
    T = len(TEXT)
    assert analysis.tokens == list(TEXT) and analysis.text == TEXT
    for q in ("i", "f", "g", "o", "c", "h"):
        assert analysis.gates[q].shape == (2, T, 32) and analysis.gates[q].dtype == np.float32
    for layer in range(analysis.num_layers):
        i, f, g, o, c, h = (analysis.values(q, layer).astype(np.float64) for q in "ifgoch")
        assert ((0 <= i) & (i <= 1) & (0 <= f) & (f <= 1) & (0 <= o) & (o <= 1)).all()
        assert (np.abs(g) <= 1).all()
        c_prev = np.vstack([np.zeros((1, c.shape[1])), c[:-1]])
        np.testing.assert_allclose(c, f * c_prev + i * g, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h, o * np.tanh(c), rtol=1e-5, atol=1e-6)


def test_trace_and_guesses_are_what_the_weights_compute(model, analysis):
    """Recompute every gate from the state_dict in float64 (torch's order i, f, g, o; the input
    of layer k > 0 is H of layer k-1) and the next-token probabilities from the head."""
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    x = sd["embedding.weight"][analysis.token_ids]  # (T, E)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for layer in range(analysis.num_layers):
        h_rec = np.vstack([np.zeros((1, 32)), analysis.values("h", layer)[:-1].astype(np.float64)])
        pre = (
            x @ sd[f"lstm.weight_ih_l{layer}"].T
            + h_rec @ sd[f"lstm.weight_hh_l{layer}"].T
            + sd[f"lstm.bias_ih_l{layer}"]
            + sd[f"lstm.bias_hh_l{layer}"]
        )  # (T, 4H)
        i, f, g, o = np.split(pre, 4, axis=1)
        for q, want in (("i", sig(i)), ("f", sig(f)), ("g", np.tanh(g)), ("o", sig(o))):
            np.testing.assert_allclose(analysis.values(q, layer), want, atol=2e-5, err_msg=q)
        x = analysis.values("h", layer).astype(np.float64)
    logits = x @ sd["head.weight"].T + sd["head.bias"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for t in range(len(analysis)):
        best = np.argsort(-probs[t])[:3]
        assert [s for s, _ in analysis.top[t]] == [model.tokenizer.decode([k]) for k in best]
        np.testing.assert_allclose([p for _, p in analysis.top[t]], probs[t, best], atol=1e-5)
    ids = analysis.token_ids
    np.testing.assert_allclose(
        analysis.target_prob[:-1], probs[np.arange(len(ids) - 1), ids[1:]], atol=1e-5
    )
    assert np.isnan(analysis.target_prob[-1])


# --------------------------------------------------------------------------- terminal


def test_terminal_table_plain_and_coloured(analysis):
    plain = render(analysis, color=False)
    assert "\x1b" not in plain
    lines = plain.splitlines()
    layer, cells, by_default = resolve(analysis)
    assert layer == 1 and len(cells) == 3 and by_default
    var = analysis.values("h", 1).var(axis=0)
    assert sorted(cells) == sorted(np.argsort(-var)[:3].tolist())  # the most variable h
    assert lines[0].startswith(f"layer 1 (layers 0..1), cells {', '.join(map(str, cells))}")
    assert "whose h varies most" in lines[0]
    rows = [ln for ln in lines if re.match(r"\s*\d+  ", ln)]
    assert len(rows) == len(TEXT)
    assert rows[3].split()[1] == "␣" and any(r.split()[1] == "\\n" for r in rows)
    # one row: t, token, then f i g o c h of each cell, then the top-3 guesses
    t = 5
    first = [float(v) for v in rows[t].split("│")[1].split()]
    want = [float(analysis.values(q, 1)[t, cells[0]]) for q in "figoch"]
    np.testing.assert_allclose(first, want, atol=0.006)
    guess, p = analysis.top[t][0]
    assert f"{p:4.0%}".strip() in rows[t].split("│")[-1]

    coloured = render(analysis, layer=0, cells=[3, 17], color=True)
    assert "\x1b[48;5;" in coloured and coloured.count("\x1b[0m") >= len(TEXT) * 12
    assert "cells 3, 17: as asked" in coloured
    # each cell's colours span its own robust scale: its largest |c| is at (or past) an end
    c3 = analysis.values("c", 0)[:, 3]
    t_max = int(np.argmax(np.abs(c3)))
    row = [
        ln
        for ln in coloured.splitlines()
        if re.match(rf"\s*{t_max}  ", re.sub(r"\x1b\[[0-9;]*m", "", ln))
    ][0]
    end = rgb("c", float(c3[t_max]), scale_for("c", c3))
    assert end in ((33, 102, 172), (178, 24, 43))  # the end colours of the state scale
    assert f"\x1b[48;5;{_ansi256(end)}m" in row
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured).count("\n") == coloured.count("\n")


def test_terminal_rejects_bad_indices(analysis):
    with pytest.raises(ValueError, match=r"0\.\.1"):
        resolve(analysis, layer=2)
    with pytest.raises(ValueError, match=r"0\.\.31"):
        resolve(analysis, cells=[32])


# --------------------------------------------------------------------------- the command


def test_cli_prints_a_plain_table_when_piped(tiny_run, capsys):
    assert (
        main(["inspect", str(tiny_run), "--text", "Bob is", "--layer", "0", "--cells", "3,17"]) == 0
    )
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.startswith("layer 0 (layers 0..1), cells 3, 17")
    assert "cell 3" in out and "cell 17" in out and "next: top-3" in out


def test_cli_json_round_trip(tiny_run, capsys):
    assert main(["inspect", str(tiny_run), "--text", TEXT, "--json", "--top-k", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    T = len(TEXT)
    assert {"text", "tokens", "gates", "top", "target_prob", "saturation", "selection"} <= set(out)
    assert out["text"] == TEXT and len(out["tokens"]) == T and out["level"] == "char"
    cells = out["selection"]["cells"]
    a = analyze(LanguageModel.load(tiny_run), TEXT)
    for q in "ifgoch":  # the shown layer's and cells' values
        got = np.asarray(out["gates"][q])
        assert got.shape == (T, len(cells))
        np.testing.assert_allclose(got, a.gates[q][1][:, cells], atol=1e-4)
    assert main(["inspect", str(tiny_run), "--text", TEXT, "--json", "--all"]) == 0
    everything = json.loads(capsys.readouterr().out)
    for q in "ifgoch":  # --all: every layer and cell
        assert np.asarray(everything["gates"][q]).shape == (2, T, 32)
    assert len(out["top"]) == T and all(len(row) == 4 for row in out["top"])
    assert out["target_prob"][-1] is None and 0 < out["target_prob"][0] < 1
    assert set(out["saturation"]) == {"i", "f", "o"} and len(out["saturation"]["f"]) == 2
    assert out["selection"]["layer"] == 1 and len(out["selection"]["cells"]) == 3
    assert out["meta"]["source"] == "--text"


@pytest.mark.slow
def test_cli_writes_html_and_png(tiny_run, tmp_path, capsys):
    page, png = tmp_path / "report.html", tmp_path / "gates.png"
    text_file = tmp_path / "story.txt"
    text_file.write_text(TEXT, "utf-8")
    assert (
        main(
            [
                "inspect",
                str(tiny_run),
                "--file",
                str(text_file),
                "--html",
                str(page),
                "--png",
                str(png),
                "--quantity",
                "f",
                "--cells",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and out.startswith("wrote ")
    assert str(page) in out and str(png) in out
    assert png.read_bytes()[:8] == PNG_MAGIC
    doc = page.read_text("utf-8")
    data = json.loads(re.search(r'id="analysis-data">(.*?)</script>', doc, re.S).group(1))
    assert data["default"] == {"layer": 1, "quantity": "f", "cell": 5, "t": None}
    assert data["T"] == len(TEXT)


# --------------------------------------------------------------------------- colours


def test_colour_scales_are_centred_robust_and_clipped():
    rng = np.random.default_rng(0)
    c = np.r_[rng.normal(0, 1, 999), 40.0]  # one outlier
    sc = scale_for("c", c)
    assert sc.centre == 0 and 2.0 < sc.half < 3.0  # the 98th percentile of |c|, not 40
    assert sc.half == pytest.approx(np.percentile(np.abs(c), 98))
    assert rgb("c", 0.0, sc) == (247, 247, 247)  # white at 0
    assert rgb("c", 40.0, sc) == rgb("c", sc.hi, sc) == (178, 24, 43)  # clipped to the end
    assert rgb("c", -sc.half / 2, sc) == (140, 175, 210)  # half-way to blue
    f = np.r_[np.full(90, 0.98), np.full(10, 0.1)]
    sf = scale_for("f", f)
    assert sf.centre == 0.5 and sf.half == pytest.approx(0.48)  # gates: centred on half open
    assert rgb("f", 0.5, sf) == (247, 247, 247) and rgb("f", 1.0, sf) == (179, 88, 6)
    assert rgb("f", 0.0, sf) == (84, 39, 136)
    assert scale_for("h", [5.0, -5.0]).half == 1.0 and scale_for("i", [1.0]).half == 0.5
    assert default_scale("o").lo == 0 and default_scale("o").hi == 1
    assert scale_for("c", [0.0, 0.0]).half > 0  # never a zero-width scale


# --------------------------------------------------------------------------- HTML


EXTERNAL = [
    re.compile(r"""\b(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:|//|ftp:)""", re.I),
    re.compile(r"<link\b", re.I),
    re.compile(r"@import", re.I),
    re.compile(r"\burl\s*\(", re.I),
    re.compile(r"\bfetch\s*\(|XMLHttpRequest|WebSocket|EventSource|importScripts", re.I),
    re.compile(r"<(?:iframe|img|object|embed|audio|video)\b", re.I),
    re.compile(r"<script\b[^>]*\bsrc\s*=", re.I),
]


def test_html_is_self_contained_and_shows_the_text(analysis):
    doc = render_html(analysis)
    for pattern in EXTERNAL:
        assert not pattern.search(doc), pattern.pattern
    assert "http://" not in doc and "https://" not in doc
    assert html.escape(TEXT, quote=False) in doc
    for hook in (
        'id="layer"',
        'id="quantity"',
        'id="cell"',
        'id="text"',
        'id="tooltip"',
        'id="saturation"',
        'id="legend"',
    ):
        assert hook in doc, hook
    for q in "ifgoch":
        assert f'<canvas id="heat-{q}"' in doc
    spans = re.findall(r'<span class="tok" data-t="(\d+)">', doc)
    assert [int(t) for t in spans] == list(range(len(TEXT)))
    layer_options = re.search(r'<select id="layer">(.*?)</select>', doc, re.S).group(1)
    assert re.findall(r'value="(\d+)"', layer_options) == ["0", "1"]
    sat = analysis.saturation()
    assert f'data-gate="f" data-layer="1" data-side="right">{sat["f"][1]["right"]:.1%}' in doc
    for words in (
        "forget gate",
        "input gate",
        "output gate",
        "new information",
        "cell state",
        "hidden state",
        "Karpathy",
    ):
        assert words in doc


def test_html_embeds_the_arrays_exactly_and_safely():
    tokens = list("a</script><!--b ") + ["\n", "c"]
    a = fake_analysis(tokens, layers=2, size=8)
    a.gates["c"] *= 7  # unbounded: travels as 16-bit
    doc = render_html(a, layer=0, cell=3, quantity="g")
    start = doc.index('id="analysis-data">') + len('id="analysis-data">')
    raw = doc[start : doc.index("</script>", start)]
    assert "</" not in raw and "<!--" not in raw
    data = json.loads(raw)
    assert data["tokens"] == tokens
    assert data["default"] == {"layer": 0, "quantity": "g", "cell": 3, "t": None}
    assert data["top"][0][2][0] == "</"
    for q in "ifgoch":
        for layer in range(2):
            packed = data["arrays"][q][layer]
            dtype = np.uint8 if packed["bits"] == 8 else np.dtype("<u2")
            ints = np.frombuffer(base64.b64decode(packed["data"]), dtype=dtype)
            step = (packed["hi"] - packed["lo"]) / (2 ** packed["bits"] - 1)
            got = (packed["lo"] + ints * step).reshape(len(tokens), packed["n"])
            np.testing.assert_allclose(got, a.gates[q][layer], atol=step / 2 + 1e-6)
            assert packed["bits"] == (16 if q == "c" else 8)
    assert html.escape("a</script><!--b ", quote=False) in doc
    # the default cell (no cell given) is the one whose h varies most in the layer
    doc2 = render_html(a, layer=1)
    want = int(np.argmax(a.gates["h"][1].astype(np.float64).var(axis=0)))
    assert f'"cell":{want}' in doc2
    # chosen cells come first, the first colours the text, and a focus token is remembered
    doc3 = render_html(a, layer=1, cells=[6, 2], focus=4, notes="two <chosen> cells")
    data3 = json.loads(re.search(r'id="analysis-data">(.*?)</script>', doc3, re.S).group(1))
    assert data3["order"][1][:2] == [6, 2] and sorted(data3["order"][1]) == list(range(8))
    assert data3["default"] == {"layer": 1, "quantity": "c", "cell": 6, "t": 4}
    assert data3["chosen"] == {"layer": 1, "cells": [6, 2]}
    assert "two &lt;chosen&gt; cells" in doc3 and '<option value="6" selected>6  (chosen)' in doc3


def test_html_rejects_bad_choices():
    a = fake_analysis(list("abc"))
    with pytest.raises(ValueError, match="layer 2"):
        render_html(a, layer=2)
    with pytest.raises(ValueError, match="cell 8"):
        render_html(a, cell=8)
    with pytest.raises(ValueError, match="quantity"):
        render_html(a, quantity="z")
    with pytest.raises(ValueError, match="cell 9"):
        render_html(a, cells=[1, 9])
    with pytest.raises(ValueError, match="focus 3 is out of range: the text has 3 tokens"):
        render_html(a, focus=3)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to check the script")
def test_html_script_is_valid_javascript(tmp_path):
    doc = render_html(fake_analysis(list("hello")))
    script = re.findall(r"<script>(.*?)</script>", doc, re.S)
    assert len(script) == 1
    (tmp_path / "page.js").write_text(script[0], "utf-8")
    run = subprocess.run(
        ["node", "--check", str(tmp_path / "page.js")], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs a headless chromium")
@pytest.mark.slow
def test_html_page_runs_in_a_browser(tmp_path):
    """The script runs: tokens get colours, the hash picks the view, the tooltip shows guesses."""
    tokens = list("Bob is evil.")
    page = tmp_path / "r.html"
    page.write_text(render_html(fake_analysis(tokens)), "utf-8")
    try:
        run = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--dump-dom",
                f"file://{page}#layer=0&quantity=f&cell=2&t=4",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish in 90 s")
    if run.returncode != 0 or "<body" not in run.stdout:
        pytest.skip(f"chromium could not run here: {run.stderr[-300:]}")
    dom = run.stdout
    assert 'data-ready="1"' in dom
    assert 'data-layer="0"' in dom and 'data-quantity="f"' in dom and 'data-cell="2"' in dom
    coloured = re.findall(r'class="tok[^"]*" data-t="\d+" style="background-color: rgb', dom)
    assert len(coloured) == len(tokens)
    tip = re.search(r'<div id="tooltip"[^>]*>(.*?)</div>\s*<script', dom, re.S).group(1)
    assert "top 3 guesses" in tip and "50.0%" in tip and "actually next" in tip


# --------------------------------------------------------------------------- PNG


@pytest.mark.slow
def test_png_is_written_and_long_texts_are_cut(analysis, tmp_path):
    out = plot_png(analysis, tmp_path / "a.png", layer=0, quantity="h")
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    assert out["layer"] == 0 and out["tokens"] == len(TEXT) and out["cells"] == 32
    long = fake_analysis(list("abc def " * 40), size=100)
    out = plot_png(long, tmp_path / "b.png", cell=7)
    assert out == {
        "path": str(tmp_path / "b.png"),
        "layer": 1,
        "cell": 7,
        "quantity": "c",
        "tokens": 200,
        "of_tokens": 320,
        "cells": 64,
        "of_cells": 100,
    }
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*tmp*"))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of --text TEXT or --file FILE"),
        (["--text", "Bob", "--file", "x.txt"], "exactly one of --text TEXT or --file FILE"),
        (
            ["--text", "Bob", "--layer", "2"],
            "--layer 2 is out of range: the model has 2 layers (0..1)",
        ),
        (["--text", "Bob", "--layer", "-1"], "(0..1)"),
        (["--text", "Bob", "--cells", "3,32"], "cell 32 is out of range: each layer has 32 cells"),
        (["--text", "Bob", "--cells", "3,x"], "--cells must be cell numbers separated by commas"),
        (["--text", "Bob", "--top-k", "0"], "--top-k=0 is not valid; expected an int >= 1"),
        (["--text", ""], "is empty"),
        (["--file", "missing.txt"], "cannot read"),
    ],
)
def test_cli_user_errors(tiny_run, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(tiny_run), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glasslstm inspect: error: ") and err.count("\n") == 0
    assert message in err


def test_cli_file_must_be_utf8(tiny_run, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"Bob is " + "caf\xe9".encode("latin-1"))
    assert main(["inspect", str(tiny_run), "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid UTF-8: at byte offset 10" in err and "iconv" in err


def test_cli_bad_run_dir(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope"), "--text", "a"]) == 2
    assert "glasslstm inspect: error:" in capsys.readouterr().err


def test_inspect_views_have_no_torch():
    """The views work on NumPy arrays only (ARCHITECTURE: no torch in views). The package's
    __init__ imports analyze(), which needs torch; the view modules themselves do not."""
    from glasslstm.commands import inspect as command
    from glasslstm.inspection import common, pictures, terminal
    from glasslstm.inspection import html as html_view

    assert callable(command.run) and callable(command.add_parser)
    for module in (common, html_view, pictures, terminal):
        source = Path(module.__file__).read_text("utf-8")
        assert not re.search(r"^\s*(?:import torch|from torch)", source, re.M), module.__name__


def test_views_handle_a_projected_hidden_state(tmp_path):
    """With proj_size, H_t has fewer entries than C_t: cells past them show no h."""
    a = fake_analysis(list("abcdef"), size=8)
    a.gates["h"] = a.gates["h"][:, :, :4].copy()
    table = render(a, cells=[6, 1])
    row = [ln for ln in table.splitlines() if ln.startswith("0  ")][0]
    assert row.split("│")[1].split()[-1] == "-" and row.split("│")[2].split()[-1] != "-"
    data = json.loads(
        re.search(r'id="analysis-data">(.*?)</script>', render_html(a, cell=6), re.S).group(1)
    )
    assert data["arrays"]["h"][0]["n"] == 4 and data["arrays"]["c"][0]["n"] == 8
    assert plot_png(a, tmp_path / "p.png", cell=6, quantity="h")["cell"] == 6

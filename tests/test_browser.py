"""Real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) on the web inspector
served by uvicorn and on the HTML report of `glasslstm inspect`.

./dev installs chromium where it runs as root (CI does); elsewhere these tests skip, but with CI
set a missing browser is a failure, so CI cannot pass without running them.
"""

import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import STORY
from glasslstm.cli import build_parser, main
from glasslstm.inspection import analyze
from glasslstm.inspection.common import rgb, scale_for
from glasslstm.model import LanguageModel

CHROMIUM = "/usr/bin/chromium"
# Debian's chromium on a machine without a network: no GPU, no background traffic, no first-run
# and sync chatter (python.md). Playwright's launch() gives each browser a fresh, empty profile.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000
TEXT = 'Bob is a nice person. "Run," said Bob.'


def _require(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} must be installed by ./dev in CI")
    pytest.skip(f"needs {what}")


@pytest.fixture(scope="module")
def browser():
    _require(os.access(CHROMIUM, os.X_OK), f"chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def server(tiny_run):
    """`glasslstm serve`'s app under uvicorn in a thread, on a free port of 127.0.0.1."""
    import uvicorn

    from glasslstm.commands.serve import listen
    from glasslstm.inspection.server import create_app

    app = create_app(tiny_run, max_chars=200, val_text=STORY * 2)
    sock = listen("127.0.0.1", 0)  # listening already: requests queue until uvicorn accepts
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()
    assert not thread.is_alive()


def colours(page, selector):
    return page.eval_on_selector_all(selector, "els => els.map(e => e.style.backgroundColor)")


def shown(token):  # the page's visible form of a token (app.js `show`)
    return {"\n": "\u21b5", "\t": "\u21e5", " ": "\u2423"}.get(token, token)


def wait_analysed(page, text):
    page.wait_for_function("t => document.querySelector('#next').dataset.text === t", arg=text)


@pytest.mark.slow
def test_typing_updates_predictions_and_gates(page, server, tiny_run):
    model = LanguageModel.load(tiny_run)
    page.goto(server)
    page.wait_for_function("document.querySelectorAll('#layer option').length === 2")
    page.locator("#text").press_sequentially("Bob is")
    wait_analysed(page, "Bob is")
    bars = page.locator("#next .bar .label").all_inner_texts()
    assert bars == [shown(p.text) for p in model.predict_next("Bob is", top=10)]
    widths = page.eval_on_selector_all(
        "#next .fill", "els => els.map(e => parseFloat(e.style.width))"
    )
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert page.locator("#gates .tok").count() == len("Bob is")
    assert page.locator("#heatmap").evaluate("c => c.width * c.height") > 0

    page.locator("#text").press_sequentially(" a nice")
    wait_analysed(page, "Bob is a nice")
    assert page.locator("#gates .tok").count() == len("Bob is a nice")
    assert page.locator("#next .bar .label").all_inner_texts() == [
        shown(p.text) for p in model.predict_next("Bob is a nice", top=10)
    ]
    assert page.locator("#error").is_hidden()

    # the gate view: another cell re-colours at once; another quantity after a fetch
    before = colours(page, "#gates .tok")
    page.locator("#cell").fill("7")
    after_cell = colours(page, "#gates .tok")
    assert after_cell != before and len(after_cell) == len(before)
    page.locator("#quantity").select_option("f")
    page.wait_for_function(
        "document.querySelector('#legend').textContent.startsWith('forget gate')"
    )
    assert colours(page, "#gates .tok") != after_cell
    f = analyze(model, "Bob is a nice").values("f", 0)[:, 7]
    shown_values = page.eval_on_selector_all("#gates .tok", "els => els.map(e => +e.dataset.v)")
    assert shown_values == pytest.approx(f.tolist(), abs=1e-4)


@pytest.mark.slow
def test_span_cells_on_and_match(page, server, tiny_run):
    model = LanguageModel.load(tiny_run)
    text = "Bob is a nice"
    page.goto(server)
    page.wait_for_function("document.querySelectorAll('#layer option').length === 2")
    page.locator("#text").fill(text)
    wait_analysed(page, text)
    toks = page.locator("#gates .tok")

    # drag over tokens 4..8 ("is a ") selects [4, 9)
    page.mouse.move(*centre(toks.nth(4)))
    page.mouse.down()
    page.mouse.move(*centre(toks.nth(6)))
    page.mouse.move(*centre(toks.nth(8)))
    page.mouse.up()
    assert "[4, 9)" in page.locator("#span").inner_text()
    assert page.locator("#gates .tok.sel").count() == 5

    # click + shift-click selects [0, 3): "Bob"
    toks.nth(0).click()
    toks.nth(2).click(modifiers=["Shift"])
    assert "[0, 3)" in page.locator("#span").inner_text()
    h = analyze(model, text).values("h", 0)[0:3]
    threshold = 0.1
    expected = sorted(k for k in range(h.shape[1]) if (h[:, k] > threshold).all())
    assert expected, "the tiny model should have some cell on across 'Bob'"
    page.locator("#threshold").fill(str(threshold))
    page.locator("#cells-on").click()
    page.wait_for_selector("#cells li.cell")
    listed = page.eval_on_selector_all("#cells li.cell", "els => els.map(e => +e.dataset.cell)")
    assert sorted(listed) == expected

    # clicking a listed cell shows it in the gate view
    page.locator("#cells li.cell button").first.click()
    assert page.locator("#cell").input_value() == str(listed[0])

    page.locator("#match").click()
    page.wait_for_selector("#matches li.match")
    marks = page.locator("#matches li.match mark").all_inner_texts()
    assert any("Bob" in m for m in marks)
    assert "the given text" in page.locator("#match-info").inner_text()


def centre(locator):
    box = locator.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


@pytest.mark.slow
def test_errors_are_shown_as_messages(page, server):
    page.goto(server)
    page.wait_for_function("document.querySelectorAll('#layer option').length === 2")
    page.locator("#text").fill("Bob is Zed")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "not in the vocabulary" in error.inner_text() and "'Z'" in error.inner_text()
    page.locator("#text").fill("Bob " * 60)
    page.wait_for_function("document.querySelector('#error').textContent.includes('at most 200')")
    page.locator("#text").fill("Bob")
    wait_analysed(page, "Bob")
    assert error.is_hidden()
    page.locator("#cells-on").click()  # nothing selected yet
    assert "select a span" in error.inner_text() and "Traceback" not in error.inner_text()


def _has_command(name: str) -> bool:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return name in sub.choices


@pytest.mark.slow
def test_report_recolours_and_shows_predictions_on_hover(page, tiny_run, tmp_path):
    _require(_has_command("inspect"), "the `glasslstm inspect` command")
    out = tmp_path / "report.html"
    assert main(["inspect", str(tiny_run), "--text", TEXT, "--html", str(out)]) == 0
    page.goto(out.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    toks = page.locator("#text .tok")
    assert toks.count() == len(TEXT)

    before = colours(page, "#text .tok")
    for selector in ("#cell", "#quantity", "#layer"):
        value = page.locator(selector).evaluate(
            "s => Array.from(s.options).map(o => o.value).find(v => v !== s.value)"
        )
        page.locator(selector).select_option(value)
        now = colours(page, "#text .tok")
        assert now != before, f"changing {selector} to {value} did not re-colour the tokens"
        before = now

    # hovering a token shows what the model expected after it: its top guess and probability
    a = analyze(LanguageModel.load(tiny_run), TEXT, top_k=3)
    tip = page.locator("#tooltip")
    texts = []
    for t in (0, max(range(1, len(TEXT)), key=lambda t: a.top[t][0][1])):
        toks.nth(t).hover()
        tip.wait_for(state="visible")
        text = tip.inner_text()
        guess, p = a.top[t][0]
        assert shown(guess) in text or guess in text
        assert any(f"{100 * q:.{d}f}%" in text for q in (p, round(p, 4)) for d in (0, 1, 2)), (
            f"the top guess's probability {p:.2%} is not in the tooltip: {text!r}"
        )
        texts.append(text)
    assert texts[0] != texts[1]


# ------------------------------------------------------------------ the article's report pages


def _rgb(css: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


def _close(a, b, tol=3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["switch", "blank"])
def test_article_pages_open_on_the_chosen_cells_with_an_example_analysed(page, stories_run, which):
    run, pictures = stories_run
    found = json.loads((run / "article" / "cells.json").read_text())
    first = "subject" if which == "switch" else "hero"
    second = "hero" if which == "switch" else "subject"
    chosen = [k for k, _ in found[first]] + [k for k, _ in found[second]]
    page.goto(Path(pictures[which]["html"]).as_uri())
    page.wait_for_selector("body[data-ready='1']")
    # the cells chosen by what they do: selected, listed first, named in the notes
    assert page.locator("#cell").input_value() == str(chosen[0])
    assert page.locator("body").get_attribute("data-cell") == str(chosen[0])
    options = page.eval_on_selector_all("#cell option", "os => os.map(o => o.value)")
    assert options[: len(chosen)] == [str(k) for k in chosen]
    assert str(chosen[0]) in page.locator("#notes").inner_text()
    rows = page.locator("#heat-c").get_attribute("data-rows").split(",")
    assert rows[: len(chosen)] == [str(k) for k in chosen]
    # an example already analysed: the event's next-word guesses, pinned as bars
    a = analyze(LanguageModel.load(run), pictures[which]["text"], top_k=8)
    focus = page.locator("#focus")
    assert focus.is_visible()
    t = int(focus.get_attribute("data-t"))
    assert "brave" in page.locator("#focus-head").inner_text() or which == "switch"
    bars = page.locator("#focus-bars tr").all_inner_texts()
    assert len(bars) == 8 and shown(a.top[t][0][0]) in bars[0]
    widths = page.eval_on_selector_all("#focus-bars .bar", "els => els.map(e => e.offsetWidth)")
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    # another token, clicked, is pinned instead
    page.locator("#text .tok").nth(2).click()
    assert page.locator("#focus").get_attribute("data-t") == "2"


@pytest.mark.slow
def test_report_colours_are_centred_robust_and_the_heatmaps_have_axes(page, stories_run):
    run, pictures = stories_run
    page.goto(Path(pictures["blank"]["html"]).as_uri())
    page.wait_for_selector("body[data-ready='1']")
    a = analyze(LanguageModel.load(run), pictures["blank"]["text"], top_k=3)
    cell = int(page.locator("#cell").input_value())

    # the text: coloured by the cell's c on the robust scale centred on 0 (the legend's ends)
    values = a.values("c", 0)[:, cell]
    sc = scale_for("c", values)
    legend = page.locator("#legend").evaluate("e => ({...e.dataset})")
    step = float(np.ptp(a.values("c", 0))) / 65535  # the layer's c travels as 16-bit integers
    assert float(legend["centre"]) == 0 and float(legend["hi"]) == pytest.approx(
        sc.hi, abs=4 * step + 1e-6
    )
    assert page.locator("#legend-hi").inner_text().startswith("≥")
    painted = colours(page, "#text .tok")
    for t in range(0, len(a), 7):
        assert _close(_rgb(painted[t]), rgb("c", float(values[t]), sc)), t

    # each heatmap: its scale over its rows, centred; axes with labels; a colour bar
    for q in "ifgoch":
        cv = page.locator(f"#heat-{q}")
        d = cv.evaluate("c => ({...c.dataset, w: c.width, h: c.height})")
        rows = [int(k) for k in d["rows"].split(",")]
        sq = scale_for(q, a.values(q, 0)[:, rows])
        span = float(np.ptp(a.values(q, 0)))  # bounded quantities travel as 8-bit integers
        tol = (span / 255 if q != "c" else 4 * step) + 1e-6
        assert float(d["centre"]) == (0.5 if q in "ifo" else 0.0)
        assert float(d["hi"]) == pytest.approx(sq.hi, abs=tol), q
        x0, y0, px, rh = (float(d[k]) for k in ("x0", "y0", "px", "rh"))
        w, h = round(len(a) * px), len(rows) * rh
        assert d["w"] > x0 + w + 30 and d["h"] > y0 + h + 30  # room for the axes and the bar
        pixels = cv.evaluate(
            """(c, at) => at.map(([x, y, w, h]) =>
                Array.from(c.getContext('2d').getImageData(x, y, w, h).data))""",
            [
                [0, int(y0), int(x0) - 2, int(h)],
                [int(x0), int(y0 + h) + 2, int(w), 40],
                [int(x0 + w + 20), int(y0) + 1, 1, 1],
                [int(x0 + w + 20), int(y0 + h) - 2, 1, 1],
            ],
        )
        dark = lambda px: any(px[i] < 120 for i in range(0, len(px), 4))  # noqa: E731
        assert dark(pixels[0]) and dark(pixels[1]), f"{q}: no cell ids or token labels drawn"
        assert _close(pixels[2][:3], rgb(q, sq.hi, sq), 6), q  # the bar: high at the top
        assert _close(pixels[3][:3], rgb(q, sq.lo, sq), 6), q  # ... low at the bottom

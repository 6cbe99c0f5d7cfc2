"""Real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) on the web inspector
served by uvicorn and on the HTML report of `glasslstm inspect`.

./dev installs chromium where it runs as root (CI does); elsewhere these tests skip, but with CI
set a missing browser is a failure, so CI cannot pass without running them.

The inspector's tests run on a small model trained on the built-in stories corpus (the
article's world; conftest's ``stories_run``), served as ``glasslstm serve`` serves it.
"""

import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from glasslstm.cli import build_parser, main
from glasslstm.inspection import analyze
from glasslstm.inspection.common import rgb as report_rgb
from glasslstm.inspection.common import scale_for
from glasslstm.inspection.spans import colour_scale
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
TIMEOUT_MS = 30_000
TEXT = 'Bob is a nice person. "Run," said Bob.'
NEG, MID, POS = (33, 102, 172), (247, 247, 247), (178, 24, 43)  # app.js's diverging colours


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


def _page(browser, **options):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, **options)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on(
        "console",
        lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
    )
    return context, page, errors


@pytest.fixture
def page(browser):
    """A page for the tests that wait with Playwright's wait_for_function: it evaluates its
    predicate with eval, which the inspector's Content-Security-Policy forbids, so this context
    bypasses the policy (test_the_page_works_under_its_content_security_policy does not)."""
    context, page, errors = _page(browser, bypass_csp=True)
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def server(stories_run):
    """`glasslstm serve`'s app under uvicorn in a thread, on a free port of 127.0.0.1."""
    import uvicorn

    from glasslstm.commands.serve import listen
    from glasslstm.inspection.server import create_app

    app = create_app(stories_run)
    app.state.inspector.warm()  # as `glasslstm serve` does before it prints the address
    sock = listen("127.0.0.1", 0)  # listening already: requests queue until uvicorn accepts
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/", app.state.inspector
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()
    assert not thread.is_alive()


def colours(page, selector):
    return page.eval_on_selector_all(selector, "els => els.map(e => e.style.backgroundColor)")


def shown(token):  # the page's visible form of a token (app.js `show`)
    return {"\n": "\u21b5", "\t": "\u21e5", " ": "\u2423"}.get(token, token)


def rgb(v, scale):
    """app.js's colour of a value: diverging around the scale's centre, clipped at its ends."""
    x = max(-1.0, min(1.0, (v - scale["centre"]) / scale["half"]))
    end = NEG if x < 0 else POS
    return tuple(round(m + (e - m) * abs(x)) for m, e in zip(MID, end))


def wait_analysed(page, text):
    page.wait_for_function("t => document.querySelector('#next').dataset.text === t", arg=text)


def open_page(page, url):
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")


def pixel(page, t, row):
    """The heatmap's colour at token t, row `row` (the middle of its cell), as (r, g, b)."""
    return tuple(
        page.locator("#heatmap").evaluate(
            """(c, [t, row]) => Array.from(c.getContext('2d').getImageData(
                   t * +c.dataset.w + (c.dataset.w >> 1), row * +c.dataset.h + (c.dataset.h >> 1),
                   1, 1).data.slice(0, 3))""",
            [t, row],
        )
    )


def centre(locator):
    box = locator.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


# ------------------------------------------------------------------ the inspector
@pytest.mark.slow
def test_the_page_opens_on_the_example_already_analysed(browser, server):
    """Under its own Content-Security-Policy: no typing needed, never an empty page."""
    url, insp = server
    context, page, errors = _page(browser)  # the policy applies
    try:
        open_page(page, url)
        info = insp.info()
        ex, last = info["example"], info["num_layers"] - 1
        assert page.locator("#text").input_value() == ex
        assert page.locator("#next").get_attribute("data-text") == ex
        bars = page.locator("#next .bar .label").all_inner_texts()
        assert bars == [shown(p.text) for p in insp.model.predict_next(ex, top=10)]
        assert page.locator("#tokens .tok").count() == len(insp.tokenizer.encode(ex))
        # the last layer's most informative cells: the heatmap's rows, the first colours the text
        informative = [c["cell"] for c in info["informative"]["layers"][last]]
        assert page.locator("#layer").input_value() == str(last)
        assert page.locator("#quantity").input_value() == "h"
        assert page.locator("#cell").input_value() == str(informative[0])
        shown_cells = page.locator("#cells-shown").input_value()
        assert [int(c) for c in shown_cells.split(",")] == informative
        size = page.locator("#heatmap").evaluate(
            "c => [c.width / +c.dataset.w, c.height / +c.dataset.h]"
        )
        assert size == [len(ex), len(informative)]
        assert "most informative" in page.locator("#heat-title").inner_text()
    finally:
        context.close()
    assert errors == [], f"errors (Content Security Policy included): {errors}"


@pytest.mark.slow
def test_heatmap_has_axes_labels_and_a_centred_clipped_colour_bar(page, server):
    url, insp = server
    open_page(page, url)
    ex = page.locator("#text").input_value()
    layer = int(page.locator("#layer").input_value())
    cells = [int(c) for c in page.locator("#cells-shown").input_value().split(",")]
    h = analyze(insp.model, ex).values("h", layer)[:, cells]  # (T, K)
    T, K = h.shape
    # axes: a label per row where they fit (the selected cell's always), positions along x
    assert page.locator("#heat-ylabel").inner_text() == "cell"
    assert page.locator("#heat-xlabel").inner_text().startswith("token")
    rows = page.eval_on_selector_all(
        "#heat-y .tick",
        "els => els.map(e => [+e.dataset.cell, e.textContent, parseFloat(e.style.top)])",
    )
    assert len(rows) >= K // 2 and all(str(c) == text for c, text, _ in rows)
    assert [c for c, _, _ in rows] == [c for c in cells if c in {r[0] for r in rows}]
    assert cells[0] in [c for c, _, _ in rows]
    tops = [top for _, _, top in rows]
    assert tops == sorted(tops)
    cols = page.eval_on_selector_all(
        "#heat-x .tick",
        "els => els.map(e => [+e.dataset.t, e.textContent, parseFloat(e.style.left)])",
    )
    assert len(cols) >= 3 and cols[0][0] == 0
    assert [t for t, _, _ in cols] == sorted(t for t, _, _ in cols)
    assert all(text == str(t) for t, text, _ in cols)  # positions: too many tokens to name
    assert [left for _, _, left in cols] == sorted(left for _, _, left in cols)
    title = page.locator("#heat-title").inner_text()
    assert "hidden state H_t" in title and f"layer {layer}" in title and f"{K} cells" in title

    # the colour bar: centred on 0 for h, its ends at the robust percentiles of what is shown
    scale = colour_scale(h, "h")
    ends = page.eval_on_selector_all("#colorbar-ticks .tick", "els => els.map(e => +e.dataset.v)")
    assert ends == pytest.approx([scale["min"], 0.0, scale["max"]], abs=2e-3)
    assert "centred on 0" in page.locator("#colorbar-caption").inner_text()
    # every pixel: the diverging colour of its value (near-white at 0, clipped at the ends)
    for t, k in [(0, 0), (T // 2, 1), (T - 1, K - 1), *np.argwhere(np.abs(h) > scale["half"])[:3]]:
        want = rgb(float(h[t, k]), scale)
        got = pixel(page, int(t), int(k))
        assert max(abs(a - b) for a, b in zip(got, want)) <= 3, (t, k, h[t, k], got, want)
    t, k = np.unravel_index(np.argmin(np.abs(h)), h.shape)
    assert max(abs(a - b) for a, b in zip(pixel(page, int(t), int(k)), MID)) <= 12  # ~0: white

    # a gate: centred on 0.5
    page.locator("#quantity").select_option("f")
    page.wait_for_function("document.querySelector('#heat-title').textContent.startsWith('forget')")
    f = analyze(insp.model, ex).values("f", layer)[:, cells]
    fs = colour_scale(f, "f")
    ends = page.eval_on_selector_all("#colorbar-ticks .tick", "els => els.map(e => +e.dataset.v)")
    assert ends[1] == 0.5 and ends == pytest.approx([fs["min"], 0.5, fs["max"]], abs=2e-3)
    t, k = np.unravel_index(np.argmax(np.abs(f - 0.5)), f.shape)
    want = rgb(float(f[t, k]), fs)
    assert max(abs(a - b) for a, b in zip(pixel(page, int(t), int(k)), want)) <= 3


@pytest.mark.slow
def test_span_matching_by_default_finds_other_spans(page, server):
    """Select the full stop before the subject switch ("... is evil. For his ..."), press Find
    matches with the page's defaults: spans of the stories' validation split come back."""
    url, insp = server
    open_page(page, url)
    ex = page.locator("#text").input_value()
    t = ex.index("evil.") + len("evil")
    layer = next(  # a layer where this model has cells that single the full stop out
        k
        for k in range(insp.num_layers - 1, -1, -1)
        if _matches(insp, {"text": ex, "layer": k, "start": t, "end": t + 1})
    )
    if str(layer) != page.locator("#layer").input_value():
        page.locator("#layer").select_option(str(layer))
        page.wait_for_function(
            f"document.querySelector('#heat-title').textContent.includes('layer {layer}')"
        )
    page.locator("#tokens .tok").nth(t).click()
    assert f"[{t}, {t + 1})" in page.locator("#span").inner_text()
    assert page.locator("#threshold").input_value() == "0.5"
    assert page.locator("#pattern-cells").input_value() == "5"
    assert page.locator("#tolerance").input_value() == "1"
    page.locator("#match").click()
    page.wait_for_selector("#matches li.match")
    expected = insp.match({"text": ex, "layer": layer, "start": t, "end": t + 1})
    marks = page.locator("#matches li.match mark").all_inner_texts()
    assert marks == [m["span"].replace("\n", "\u21b5") for m in expected["matches"]]
    info = page.locator("#match-info").inner_text()
    assert f"at least {expected['need']} of cells" in info
    assert "validation split of stories" in info and "tolerance" in info


def _matches(insp, body) -> bool:
    from glasslstm.inspection.inspector import RequestError

    try:
        return bool(insp.match(body)["matches"])
    except RequestError:
        return False


@pytest.mark.slow
def test_typing_updates_predictions_and_gates(page, server):
    url, insp = server
    model = insp.model
    open_page(page, url)
    page.locator("#text").fill("")
    page.locator("#text").press_sequentially("Bob is")
    wait_analysed(page, "Bob is")
    bars = page.locator("#next .bar .label").all_inner_texts()
    assert bars == [shown(p.text) for p in model.predict_next("Bob is", top=10)]
    widths = page.eval_on_selector_all(
        "#next .fill", "els => els.map(e => parseFloat(e.style.width))"
    )
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert page.locator("#tokens .tok").count() == len("Bob is")

    page.locator("#text").press_sequentially(" a nice")
    text = "Bob is a nice"
    wait_analysed(page, text)
    assert page.locator("#tokens .tok").count() == len(text)
    assert page.locator("#next .bar .label").all_inner_texts() == [
        shown(p.text) for p in model.predict_next(text, top=10)
    ]
    assert page.locator("#error").is_hidden()

    # another quantity: fetched, and the tokens show its values for the selected cell
    before = colours(page, "#tokens .tok")
    page.locator("#quantity").select_option("f")
    page.wait_for_function("document.querySelector('#legend').textContent.includes('forget gate')")
    assert colours(page, "#tokens .tok") != before
    cell = int(page.locator("#cell").input_value())
    layer = int(page.locator("#layer").input_value())
    f = analyze(model, text).values("f", layer)
    values = page.eval_on_selector_all("#tokens .tok", "els => els.map(e => +e.dataset.v)")
    assert values == pytest.approx(f[:, cell].tolist(), abs=2e-3)

    # a cell that is not a heatmap row: fetched on demand, and added as the first row
    shown_cells = [int(c) for c in page.locator("#cells-shown").input_value().split(",")]
    other = next(c for c in range(insp.hidden_size) if c not in shown_cells)
    page.locator("#cell").fill(str(other))
    page.locator("#cell").dispatch_event("change")
    page.wait_for_function(
        f"document.querySelector('#legend').textContent.includes('cell {other} ')"
    )
    page.wait_for_function(
        f"document.querySelector('#heat-y .tick.current').dataset.cell === '{other}'"
    )
    values = page.eval_on_selector_all("#tokens .tok", "els => els.map(e => +e.dataset.v)")
    assert values == pytest.approx(f[:, other].tolist(), abs=2e-3)
    assert page.locator("#cells-shown").input_value().startswith(f"{other}, ")

    # clicking a heatmap row colours the text by that row's cell, without a fetch
    row = page.locator("#heatmap")
    box = row.bounding_box()
    h = int(row.evaluate("c => +c.dataset.h"))
    page.mouse.click(box["x"] + 5, box["y"] + 1.5 * h)  # the second row
    second = shown_cells[0] if shown_cells[0] != other else shown_cells[1]
    assert page.locator("#cell").input_value() == str(second)
    values = page.eval_on_selector_all("#tokens .tok", "els => els.map(e => +e.dataset.v)")
    assert values == pytest.approx(f[:, second].tolist(), abs=2e-3)


@pytest.mark.slow
def test_span_cells_on(page, server):
    url, insp = server
    text = "Bob is a nice person. Dan is evil."
    open_page(page, url)
    page.locator("#text").fill(text)
    wait_analysed(page, text)
    toks = page.locator("#tokens .tok")

    # drag over tokens 4..8 ("is a ") selects [4, 9)
    page.mouse.move(*centre(toks.nth(4)))
    page.mouse.down()
    page.mouse.move(*centre(toks.nth(6)))
    page.mouse.move(*centre(toks.nth(8)))
    page.mouse.up()
    assert "[4, 9)" in page.locator("#span").inner_text()
    assert page.locator("#tokens .tok.sel").count() == 5

    # click + shift-click selects [0, 3): "Bob"
    toks.nth(0).click()
    toks.nth(2).click(modifiers=["Shift"])
    assert "[0, 3)" in page.locator("#span").inner_text()
    layer = int(page.locator("#layer").input_value())
    h = analyze(insp.model, text).values("h", layer)[0:3]
    lo = h.min(0)
    threshold = round(float(np.sort(lo)[-3]) - 0.01, 2)  # about three cells on across "Bob"
    expected = sorted(k for k in range(h.shape[1]) if lo[k] > threshold)
    assert expected and len(expected) < h.shape[1]
    page.locator("#threshold").fill(str(threshold))
    page.locator("#cells-on").click()
    page.wait_for_selector("#cells li.cell")
    listed = page.eval_on_selector_all("#cells li.cell", "els => els.map(e => +e.dataset.cell)")
    near = {k for k in range(h.shape[1]) if abs(lo[k] - threshold) < 2e-3}  # float16 rounding
    assert set(listed) - near == set(expected) - near

    # clicking a listed cell colours the text by it
    page.locator("#cells li.cell button").first.click()
    page.wait_for_function(
        f"document.querySelector('#legend').textContent.includes('cell {listed[0]} ')"
    )
    assert page.locator("#cell").input_value() == str(listed[0])


@pytest.mark.slow
def test_errors_are_shown_as_messages(page, server):
    url, insp = server
    open_page(page, url)
    error = page.locator("#error")
    page.locator("#text").fill("Bob " * 520)
    error.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#error').textContent.includes('at most 2,000')")
    page.locator("#text").fill("Bob")
    wait_analysed(page, "Bob")
    assert error.is_hidden()
    page.locator("#cells-on").click()  # nothing selected yet
    assert "select a span" in error.inner_text() and "Traceback" not in error.inner_text()
    page.locator("#cells-shown").fill("1, x")
    page.locator("#cells-shown").dispatch_event("change")
    assert "separated by commas" in error.inner_text()


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
def test_article_pages_open_on_the_chosen_cells_with_an_example_analysed(page, article_run, which):
    run, pictures = article_run
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
def test_report_colours_are_centred_robust_and_the_heatmaps_have_axes(page, article_run):
    run, pictures = article_run
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
        assert _close(_rgb(painted[t]), report_rgb("c", float(values[t]), sc)), t

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
        assert _close(pixels[2][:3], report_rgb(q, sq.hi, sq), 6), q  # the bar: high at the top
        assert _close(pixels[3][:3], report_rgb(q, sq.lo, sq), 6), q  # ... low at the bottom

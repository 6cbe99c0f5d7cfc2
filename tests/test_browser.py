"""Real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) on the web inspector
served by uvicorn and on the HTML report of `glasslstm inspect`.

./dev installs chromium where it runs as root (CI does); elsewhere these tests skip, but with CI
set a missing browser is a failure, so CI cannot pass without running them.
"""

import os
import threading

import pytest

from conftest import STORY
from glasslstm.cli import build_parser, main
from glasslstm.inspection import analyze
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
    error = page.locator("#error")
    page.locator("#text").fill("Bob " * 60)
    error.wait_for(state="visible")
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

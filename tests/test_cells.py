"""The cell finder: probes, correlation ranking, a planted quote cell, `glasslstm cells`."""

import json

import numpy as np
import pytest
import torch

from conftest import STORY
from glasslstm.cli import main
from glasslstm.commands.cells import format_excerpt
from glasslstm.data import CharTokenizer
from glasslstm.inspection import Analysis, analyze
from glasslstm.inspection.analysis import QUANTITIES
from glasslstm.inspection.cells import PROBES, excerpt, find_cells, probe_signal, rank_cells
from glasslstm.model import ConfigError, LanguageModel, ModelConfig


def _analysis(tokens, **gates) -> Analysis:
    """An Analysis built by hand: each given gate (L, T, H); the others zeros like ``c``."""
    shape = next(iter(gates.values())).shape
    full = {q: np.asarray(gates.get(q, np.zeros(shape)), dtype=np.float32) for q in QUANTITIES}
    T = len(tokens)
    return Analysis(
        text="".join(tokens),
        tokens=list(tokens),
        token_ids=list(range(T)),
        level="char",
        gates=full,
        top=[[] for _ in range(T)],
        target_prob=np.full(T, np.nan),
    )


# --------------------------------------------------------------------------- probes


def test_quote_toggles_and_the_opening_quote_is_inside():
    text = 'a"bc"d"e'
    assert PROBES["quote"](text).tolist() == [0, 1, 1, 1, 0, 0, 1, 1]


def test_line_position_counts_characters_since_the_newline():
    assert PROBES["line-position"]("ab\ncde\n\nf").tolist() == [1, 2, 0, 1, 2, 3, 0, 0, 1]


def test_sentence_boundary_marks_the_last_character_of_an_ending():
    text = 'Hi. "Stop!" he said 3.5 times?!\nEnd.'
    got = np.flatnonzero(PROBES["sentence-boundary"](text)).tolist()
    assert got == [2, 10, 30, 35]  # '.', the closing '"', the '!' of '?!', the final '.'
    assert text[2] + text[10] + text[30] + text[35] == '."!.'


def test_bracket_depth_nests_and_never_goes_negative():
    assert PROBES["bracket-depth"]("a(b[c])d)e{").tolist() == [0, 1, 1, 2, 2, 1, 0, 0, 0, 0, 1]


def test_regex_probe_marks_matched_characters():
    a = _analysis(list("xx Bob yy Bobby"), c=np.zeros((1, 15, 2)))
    assert probe_signal(a, r"Bob\b").tolist() == [0] * 3 + [1] * 3 + [0] * 9


def test_word_tokens_take_the_value_at_their_last_character():
    tokens = ["say", " ", '"', "hi", '"', " ", "now"]
    a = _analysis(tokens, c=np.zeros((1, len(tokens), 2)))
    assert probe_signal(a, "quote").tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert probe_signal(a, "line-position").tolist() == [3, 4, 5, 7, 8, 9, 12]


def test_invalid_regex_and_constant_probe_are_config_errors():
    a = _analysis(list("no quotes here."), c=np.zeros((1, 15, 2)))
    with pytest.raises(ConfigError, match=r"nor a valid regular expression: missing \)"):
        probe_signal(a, "(ab")
    with pytest.raises(
        ConfigError, match="probe 'quote' is constant over this text.*double-quoted"
    ):
        probe_signal(a, "quote")
    with pytest.raises(ConfigError, match="'bracket-depth' is constant.*never opens a bracket"):
        probe_signal(a, "bracket-depth")
    with pytest.raises(ConfigError, match="'zzz' is constant.*regex matches none"):
        probe_signal(a, "zzz")


# --------------------------------------------------------------------------- ranking


def test_rank_cells_puts_a_planted_cell_first_with_r_one():
    rng = np.random.default_rng(0)
    signal = PROBES["quote"]('He said "yes" and "no" then "maybe so" and left.')
    T = len(signal)
    c = rng.normal(size=(2, T, 6))
    c[1, :, 4] = 3.0 * signal - 1.0  # layer 1 cell 4 is the signal (affinely)
    c[0, :, 2] = -signal + 0.1 * c[0, :, 2]  # layer 0 cell 2: the signal upside down, noisy
    c[0, :, 5] = 0.25  # a constant cell
    scores = rank_cells(_analysis(["x"] * T, c=c), signal)
    assert len(scores) == 12
    assert scores[0].r == pytest.approx(1.0) and (scores[0].layer, scores[0].cell) == (1, 4)
    assert -1 < scores[1].r < -0.95 and (scores[1].layer, scores[1].cell) == (0, 2)
    assert [abs(s.r) for s in scores] == sorted((abs(s.r) for s in scores), reverse=True)
    assert next(s for s in scores if (s.layer, s.cell) == (0, 5)).r == 0.0
    # the same r as numpy's Pearson
    assert scores[2].r == pytest.approx(
        np.corrcoef(c[scores[2].layer, :, scores[2].cell], signal)[0, 1]
    )
    # one layer only, another quantity
    only = rank_cells(_analysis(["x"] * T, c=c, h=c[:, :, ::-1]), signal, quantity="h", layers=[1])
    assert {s.layer for s in only} == {1} and only[0].cell == 1 and only[0].quantity == "h"


def test_rank_cells_rejects_a_constant_signal_and_a_wrong_length():
    a = _analysis(list("abcd"), c=np.ones((1, 4, 3)))
    with pytest.raises(ConfigError, match="constant"):
        rank_cells(a, np.zeros(4))
    with pytest.raises(ValueError, match="one value per token"):
        rank_cells(a, np.arange(3.0))


def test_excerpt_is_the_window_where_the_cell_follows_the_signal():
    T = 600
    signal = np.zeros(T)
    signal[400:450] = 1.0  # the only quote: tokens 400..449
    c = np.zeros((1, T, 2))
    c[0, :, 0] = signal
    c[0, :, 1] = np.linspace(0, 1, T)
    a = _analysis(["x"] * T, c=c)
    best = rank_cells(a, signal)[0]
    ex = excerpt(a, best, signal, length=100)
    assert (best.cell, len(ex.tokens)) == (0, 100)
    assert ex.start <= 400 and ex.start + 100 >= 450  # the whole quote is in view
    assert ex.pairs()[400 - ex.start] == ("x", 1.0)
    assert ex.color_range() == (-1.0, 1.0) and ex.shade().max() == 1.0


# --------------------------------------------------------------------------- planted cell

QUOTED = (
    'Bob said "run, run away" and left. Dan had a nice day; "ok" said he.\n'
    'The navy was "a long, long time ago, when I was young" for Bob.\n'
    'She asked "why?" then "why not?" and we went home with "all the bread we had".\n'
)


def planted_quote_model(k: int = 5, dim: int = 3) -> LanguageModel:
    """A 1-layer, 8-cell char LSTM whose cell ``k`` is set by hand to track quotes.

    The embedding of '"' is 1 in dimension ``dim`` (every other character 0 there; other
    dimensions random). Cell k reads only that dimension and its own h:
      off a quote: i = σ(-15) ≈ 0, f = σ(15) ≈ 1       -> c is kept
      on a quote:  i = σ(+15) ≈ 1, f = σ(-15) ≈ 0      -> c = g
      g = tanh(2 - 10 h_prev): h_prev = 0 (start) -> +1; h_prev = ±0.76 (c = ±1) -> ∓1
      o = σ(15) ≈ 1, so h = tanh(c) carries the sign back.
    So c = 0 before the first quote, then +1 inside quotes and -1 outside. The other cells
    keep torch's random init but never see h_k, so they cannot know the quote state.
    """
    chars = sorted(set(QUOTED))
    H = 8
    model = LanguageModel(
        ModelConfig(len(chars), hidden_size=H, num_layers=1, dropout=0.0), CharTokenizer(chars)
    )
    rows = {"i": k, "f": H + k, "g": 2 * H + k, "o": 3 * H + k}
    with torch.no_grad():
        emb = model.embedding.weight
        emb[:, dim] = 0.0
        emb[chars.index('"')] = 0.0
        emb[chars.index('"'), dim] = 1.0
        lstm = model.lstm
        lstm.weight_hh_l0[:, k] = 0.0  # nobody else reads h_k
        for r in rows.values():
            lstm.weight_ih_l0[r] = 0.0
            lstm.weight_hh_l0[r] = 0.0
            lstm.bias_hh_l0[r] = 0.0
        lstm.weight_ih_l0[rows["i"], dim], lstm.bias_ih_l0[rows["i"]] = 30.0, -15.0
        lstm.weight_ih_l0[rows["f"], dim], lstm.bias_ih_l0[rows["f"]] = -30.0, 15.0
        lstm.weight_hh_l0[rows["g"], k], lstm.bias_ih_l0[rows["g"]] = -10.0, 2.0
        lstm.bias_ih_l0[rows["o"]] = 15.0
    return model.eval()


def test_the_finder_recovers_a_planted_quote_cell():
    k = 5
    a = analyze(planted_quote_model(k), QUOTED)
    c = a.gates["c"][0, :, k]
    inside = PROBES["quote"](QUOTED).astype(bool)
    first = QUOTED.index('"')
    assert (c[inside] > 0.95).all() and (c[~inside][first:] < -0.95).all()  # the construction works
    report = find_cells(a, "quote")
    best, second = report.scores[:2]
    assert (best.layer, best.cell) == (0, k) and best.r > 0.9
    assert abs(second.r) < 0.6  # by a clear margin
    assert report.excerpts[0].cell == k
    h_best = find_cells(a, "quote", quantity="h").scores[0]
    assert h_best.cell == k and h_best.r > 0.9


def test_plain_rendering_of_the_planted_cell_lines_up_with_the_quotes():
    a = analyze(planted_quote_model(), QUOTED)
    ex = find_cells(a, "quote", excerpts=1).excerpts[0]
    shown = format_excerpt(ex, "quote", color=False, width=40)
    rows = [l[8:] for l in shown.splitlines()[1:] if l]
    texts, cells, probes = rows[0::3], rows[1::3], rows[2::3]
    assert "".join(texts) == "".join(ex.tokens).replace("\n", "↵")
    assert max(len(t) for t in texts) == 40  # wrapped at the width
    assert all(len(t) == 40 or t.endswith("↵") for t in texts[:-1])  # or after a newline
    assert cells == probes  # c = ±1 is the probe
    assert set("".join(cells)) == {"▁", "█"}


def test_read_text_takes_a_named_corpus_validation_split():
    from glasslstm.commands.cells import read_text
    from glasslstm.data import load_corpus

    text, what = read_text("stories")
    assert text == load_corpus("stories").val.decode() and what == "the validation split of stories"


# --------------------------------------------------------------------------- the command


@pytest.fixture
def story_file(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(STORY * 3, encoding="utf-8")
    return path


def test_cells_cli_json(tiny_run, story_file, capsys):
    assert (
        main(
            [
                "cells",
                str(tiny_run),
                "--data",
                str(story_file),
                "--probe",
                "quote",
                "--top",
                "4",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["probe"] == "quote" and out["quantity"] == "c" and out["tokens"] == len(STORY) * 3
    assert out["cells_searched"] == 64 and len(out["cells"]) == 4 and len(out["excerpts"]) == 3
    rs = [abs(c["r"]) for c in out["cells"]]
    assert rs == sorted(rs, reverse=True) and 0 < rs[0] <= 1
    ex = out["excerpts"][0]
    assert (ex["layer"], ex["cell"]) == (out["cells"][0]["layer"], out["cells"][0]["cell"])
    assert len(ex["tokens"]) == len(ex["values"]) == len(ex["signal"]) == 200
    assert set(ex["signal"]) <= {0.0, 1.0}


@pytest.mark.slow
def test_cells_cli_table_excerpts_and_png(tiny_run, story_file, tmp_path, capsys):
    png = tmp_path / "cell.png"
    assert (
        main(
            [
                "cells",
                str(tiny_run),
                "--data",
                str(story_file),
                "--probe",
                "line-position",
                "--layer",
                "1",
                "--quantity",
                "h",
                "--max-chars",
                "300",
                "--png",
                str(png),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "probe 'line-position' over the first 300 characters of" in out
    assert "32 cells of h in 1 layer" in out
    assert "  rank  layer  cell        r" in out
    table = [l.split() for l in out.splitlines() if l[:6].strip().isdigit()]
    assert [int(r[0]) for r in table] == [1, 2, 3, 4, 5] and {r[1] for r in table} == {"1"}
    rows = [l[:8] for l in out.splitlines()]
    assert rows.count("  text  ") >= 3 and rows.count("  cell  ") == rows.count("  probe ")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out


def test_ansi_rendering_colours_each_token(tiny_run, story_file):
    a = analyze(LanguageModel.load(tiny_run), STORY)
    ex = find_cells(a, "quote", excerpts=1).excerpts[0]
    shown = format_excerpt(ex, "quote", color=True)
    assert shown.count("\x1b[48;2;") == len(ex.tokens) and shown.rstrip("\n").endswith("\x1b[0m")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--probe", "(unclosed"],
            "nor a valid regular expression: missing ), unterminated subpattern",
        ),
        (
            ["--probe", "bracket-depth", "--max-chars", "100"],
            "probe 'bracket-depth' is constant over "
            "this text (100 tokens): it never opens a bracket ( [ {; "
            "choose a text that has brackets",
        ),
        (["--layer", "2"], "--layer 2 is out of range: the model has 2 layers (0..1)"),
        (
            ["--png", "/nonexistent-dir/x.png"],
            "--png='/nonexistent-dir/x.png' is not valid; expected a file path in an existing "
            "folder (/nonexistent-dir does not exist",
        ),
    ],
)
def test_cells_cli_user_errors(tiny_run, story_file, capsys, argv, message):
    assert main(["cells", str(tiny_run), "--data", str(story_file), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glasslstm cells: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_cells_cli_missing_file_and_unknown_characters(tiny_run, tmp_path, capsys):
    assert main(["cells", str(tiny_run), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "is neither a named corpus" in capsys.readouterr().err
    odd = tmp_path / "odd.txt"
    odd.write_text('Bob said "zzz" ~ 42.', encoding="utf-8")
    assert main(["cells", str(tiny_run), "--data", str(odd)]) == 0  # read with <unk>
    chars = set(tiny_run_vocab(tiny_run))
    unknown = sum(c not in chars for c in odd.read_text())
    assert unknown > 0
    err = capsys.readouterr().err
    assert f"{unknown} characters of {odd} not in the model's vocabulary" in err


def tiny_run_vocab(run_dir) -> list[str]:
    return json.loads((run_dir / "vocab.json").read_text())["chars"]

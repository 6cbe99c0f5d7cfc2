"""Progress while training: a bar in a terminal, a line every few seconds elsewhere."""

from __future__ import annotations

import io
import re

import pytest

from glasslstm import progress
from glasslstm.data import Corpus
from glasslstm.progress import Bar, Lines, make_progress
from glasslstm.trainer import TrainConfig, train


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    """time.monotonic as the progress module sees it, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def test_outside_a_terminal_a_line_every_interval_not_every_step(clock):
    out = io.StringIO()
    bar = make_progress(max_steps=400, time_budget=0, file=out, interval=10.0)
    assert isinstance(bar, Lines)
    with bar:
        for step in range(1, 401):  # 0.25 s a step: 100 s in all
            clock[0] += 0.25
            bar.advance(step, step * 0.25)
            bar.show(loss="1.234", bpc="1.780")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # the first step, then one line per 10 s (steps 41, 81, ... 361), and the end
    steps = [int(re.match(r"train: step (\d+)/400", line).group(1)) for line in lines]
    assert steps == [1, *range(41, 400, 40), 400]
    assert lines[5] == (
        "train: step 201/400 (50%), 50 s of training, about 50 s left; loss 1.234, bpc 1.780"
    )


def test_lines_with_a_time_budget_say_time_spent_and_left(clock):
    out = io.StringIO()
    with make_progress(max_steps=0, time_budget=600, file=out, interval=5.0) as bar:
        for step in range(1, 31):
            clock[0] += 10
            bar.advance(step, step * 10.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 30  # one per 10 s step: more than the interval apart
    assert lines[14] == "train: step 15, 150 s/600 s (25%) of training, about 8 min left"


def test_in_a_terminal_a_bar_counts_toward_the_time_budget():
    out = Terminal()
    bar = make_progress(max_steps=0, time_budget=600, file=out)
    assert isinstance(bar, Bar) and bar.by_time
    for step in range(1, 4):
        bar.advance(step, step * 100.0)
    bar.show(loss="2.000")
    bar.close()
    text = out.getvalue()
    assert "300/600 s of training" in text and "left" in text and "spent" in text
    assert "step=3" in text and "loss=2.000" in text


def test_in_a_terminal_without_a_budget_the_bar_counts_steps():
    out = Terminal()
    bar = make_progress(max_steps=50, time_budget=0, file=out)
    assert isinstance(bar, Bar) and not bar.by_time
    bar.advance(7, 1.0)
    bar.close()
    assert "7/50" in out.getvalue()


@pytest.mark.slow
def test_training_into_a_log_writes_lines_not_a_redraw_per_step(tmp_path, capsys):
    text = ("Bob is a nice person. Dan, on the other hand, is evil. " * 40).encode()
    cfg = TrainConfig(
        hidden=16, layers=1, seq_len=16, batch_size=4, max_steps=30, eval_every=30, warmup=2
    )
    train(
        TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "r")}),
        corpus=Corpus("t", text[:2000], text[2000:], "test"),
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    assert "\r" not in err and 2 <= len(lines) < 30
    assert lines[0].startswith("train: step 1/30") and lines[-1].startswith("train: step 30/30")

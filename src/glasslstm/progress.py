"""How far a training run has come, shown as it goes.

In a terminal: a tqdm bar, redrawn in place. It counts steps toward ``--max-steps``, or, when
the run has a ``--time-budget``, seconds of training toward the budget, so that its estimate
of the time left is the budget's and not that of a step limit the run will never reach.

Anywhere else (a log file, a pipe, a batch scheduler's output): one plain line every
``interval`` seconds and one at the end, never a redraw per step, e.g.::

    train: step 120/600 (20%), 45 s of training, about 3 min left; loss 1.234, bpc 1.780

:func:`make_progress` picks the one that suits the output.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

LINE_INTERVAL_S = 10.0  # seconds between progress lines outside a terminal


def make_progress(
    *,
    max_steps: int,
    time_budget: float,
    step: int = 0,
    seconds: float = 0.0,
    file: IO[str] | None = None,
    interval: float = LINE_INTERVAL_S,
) -> Progress:
    """The progress display for a run with these limits (``max_steps`` 0: none;
    ``time_budget`` 0: none), starting at ``step`` after ``seconds`` of training: a bar in a
    terminal, lines elsewhere."""
    file = file if file is not None else sys.stderr
    isatty = getattr(file, "isatty", None)
    cls = Bar if isatty is not None and isatty() else Lines
    return cls(max_steps, time_budget, step, seconds, file, interval)


class Progress:
    """``advance(step, seconds)`` after each step, ``show(**figures)`` to put the latest
    figures (loss, bpc, tokens/s) beside it, ``close()`` at the end (or use ``with``)."""

    def __init__(
        self,
        max_steps: int,
        time_budget: float,
        step: int,
        seconds: float,
        file: IO[str],
        interval: float,
    ):
        self.max_steps, self.time_budget = max_steps, time_budget
        self.step, self.seconds = step, seconds
        self.file, self.interval = file, interval
        self.figures: dict[str, str] = {}

    def advance(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def show(self, **figures: str) -> None:
        self.figures = dict(figures)

    def close(self) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Bar(Progress):
    """tqdm, in seconds of the time budget when there is one, else in steps."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        from tqdm.auto import tqdm

        self.by_time = self.time_budget > 0
        if self.by_time:
            self.bar = tqdm(
                total=self.time_budget,
                initial=min(self.seconds, self.time_budget),
                unit="s",
                dynamic_ncols=True,
                desc="train",
                leave=True,
                file=self.file,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of "
                "training [{elapsed} spent, {remaining} left{postfix}]",
            )
        else:
            self.bar = tqdm(
                total=self.max_steps,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                desc="train",
                leave=True,
                file=self.file,
            )

    def advance(self, step: int, seconds: float) -> None:
        if self.by_time:
            self.bar.update(min(seconds, self.time_budget) - min(self.seconds, self.time_budget))
        else:
            self.bar.update(step - self.step)
        super().advance(step, seconds)

    def show(self, **figures: str) -> None:
        super().show(**figures)
        if self.by_time:
            figures = {"step": str(self.step), **figures}
        self.bar.set_postfix(figures, refresh=False)

    def close(self) -> None:
        self.bar.close()


class Lines(Progress):
    """A line now and then: at the first step, every ``interval`` seconds, and at the end."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.start_step, self.start_seconds = self.step, self.seconds
        self.last_line: float | None = None  # time.monotonic() of the last line written
        self.written_step: int | None = None

    def advance(self, step: int, seconds: float) -> None:
        super().advance(step, seconds)
        now = time.monotonic()
        if self.last_line is None or now - self.last_line >= self.interval:
            self.write()
            self.last_line = now

    def close(self) -> None:
        if self.written_step != self.step:
            self.write()

    def write(self) -> None:
        if self.max_steps:
            where = f"step {self.step}/{self.max_steps} ({self.step / self.max_steps:.0%})"
        else:
            where = f"step {self.step}"
        spent = f"{self.seconds:.0f} s"
        if self.time_budget:
            spent += f"/{self.time_budget:.0f} s ({min(self.seconds / self.time_budget, 1):.0%})"
        parts = [where, f"{spent} of training"]
        left = self.seconds_left()
        if left is not None:
            parts.append(f"about {_duration(left)} left")
        line = "train: " + ", ".join(parts)
        if self.figures:
            line += "; " + ", ".join(f"{k} {v}" for k, v in self.figures.items())
        try:
            print(line, file=self.file, flush=True)
        except OSError:  # the log went away (a closed terminal): training goes on
            pass
        self.written_step = self.step

    def seconds_left(self) -> float | None:
        """Training seconds left: to the time budget or to the step limit, whichever comes
        first at the speed so far (None before there is a speed to go by)."""
        lefts = []
        if self.time_budget:
            lefts.append(max(0.0, self.time_budget - self.seconds))
        steps_done = self.step - self.start_step
        if self.max_steps and steps_done > 0:
            per_step = (self.seconds - self.start_seconds) / steps_done
            lefts.append(max(0, self.max_steps - self.step) * per_step)
        return min(lefts) if lefts else None


def _duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``1 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"

"""The article's two pictures, drawn from a trained stories model.

1. **The subject switch** ("Bob is a nice person. Dan, on the other hand, is evil."): the cells
   that track who the text is about, with their cell state and forget gate around "on the other
   hand" and the full stop, and the model's next word after the switch sentence.
2. **The blank** ("... For his contributions, brave ____"): the cells that keep the hero while
   the text is about someone else, and the model's next-word bars at the blank.

The cells are chosen by what they do, measured on held-out stories (:func:`find_cells`): the
*subject cells* are those whose cell state correlates most with the gender of whoever the
current sentence is about, the *hero cells* those whose cell state correlates most with the
hero's gender — both measured where the text is about someone other than the hero, so that the
two do not coincide. Each picture is a PNG (:func:`~glasslstm.inspection.pictures.plot_event`)
and a self-contained HTML report that opens on the same cells
(:func:`~glasslstm.inspection.html.write_html`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from glasslstm import rundir, stories
from glasslstm.inspection.analysis import analyze
from glasslstm.inspection.cells import _pearson
from glasslstm.inspection.html import write_html
from glasslstm.inspection.pictures import CellGroup, plot_event

__all__ = ["BLANK_TEXT", "SWITCH_TEXT", "draw_pictures", "find_cells", "subjects"]

CELLS_SHOWN = 6  # per group
PROBE_STORIES = 300  # held-out stories the cells are chosen on
HELD_OUT_SEED = 1  # of stories.held_out (the scores use seed 0)

# The article's sentences, continued so that the subject switches twice: to someone of the same
# gender (Dan) and to someone of the other (Mary).
SWITCH_TEXT = (
    "Bob is a nice person. He can swim. Dan, on the other hand, is evil. He lies to everyone. "
    "Mary, on the other hand, never left Rome. She steals from her neighbours."
)
# The article's deed, then two other people (one of the hero's gender) before the blank.
BLANK_TEXT = (
    "Bob fought the enemy alone and died for his country. Dan, on the other hand, ran away "
    "from the enemy. He hid at the station during the war. Mary is the sister of Dan. She only "
    "cares about her garden. For his contributions, brave "
)
_SENTENCE = re.compile(r"[^.]*\.\s*|[^.]+$")
_NAMES = frozenset(stories.MALE_NAMES + stories.FEMALE_NAMES)


def subjects(text: str, hero: str | None = None) -> list[tuple[int, int, str]]:
    """``[(start, end, name)]``: each sentence of a stories-style text and whom it is about —
    the first name it says, else the person of the sentence before; the closing "For his
    contributions, brave ..." is about ``hero`` (default: the first name of the text)."""
    out: list[tuple[int, int, str]] = []
    current = hero
    for m in _SENTENCE.finditer(text):
        if not m.group().strip():
            continue
        named = [w for w in stories.words(m.group()) if w in _NAMES]
        if m.group().lstrip().startswith("For ") and ", brave" in m.group():
            named = [hero or current or ""]
        current = named[0] if named else current
        hero = hero or current
        out.append((m.start(), m.end(), current or ""))
    return out


def _gender(name: str) -> float:
    return 1.0 if name in stories.MALE_NAMES else -1.0


def _eta_squared(x: np.ndarray, groups: list[str]) -> np.ndarray:
    """Per column of ``x`` (N, H): the share of its variance that the groups explain."""
    labels = np.array(groups)
    mean = x.mean(0)
    total = ((x - mean) ** 2).sum(0)
    between = sum((labels == g).sum() * (x[labels == g].mean(0) - mean) ** 2 for g in set(groups))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, between / total, 0.0)


def find_cells(model, held: list[stories.Story], layer: int = 0, n: int = CELLS_SHOWN) -> dict:
    """The subject cells and the hero cells of ``layer``, measured on ``held`` (each story run
    up to its blank) where the text is about someone other than the hero (from the first subject
    switch to the closing sentence):

    - subject cells: the Pearson correlation ``r``, over those sentences, of the cell state
      (averaged over the sentence) with the gender (+1 he, -1 she) of whom the sentence is about;
    - hero cells: ``eta2``, the share of the variance of the cell state (averaged over that part
      of each story) that the hero's name explains, across the stories.

    Returns ``{"subject": [[cell, r], ...], "hero": [[cell, eta2], ...], "sentences",
    "stories", "layer"}``, strongest first (the hero cells leave out the subject cells)."""
    sentences, genders, stretches, heroes = [], [], [], []
    for s in held:
        a = analyze(model, s.prompt, top_k=1)
        ends = np.cumsum([len(t) for t in a.tokens])
        c = a.values("c", layer)
        first_switch = s.switches[0][0] if s.switches else len(s.prompt)
        close = s.prompt.rfind("For ")
        inside = (ends > first_switch) & (ends <= close)
        if not inside.any():
            continue
        stretches.append(c[inside].mean(0))
        heroes.append(s.hero)
        for start, end, name in subjects(s.prompt, s.hero):
            rows = inside & (ends > start) & (ends <= end)
            if rows.any():
                sentences.append(c[rows].mean(0))
                genders.append(_gender(name))
    if len(sentences) < 3 or len(stretches) < 3:
        raise ValueError("find_cells needs stories with subject switches (stories.held_out)")
    r = _pearson(np.array(sentences), np.array(genders))
    eta2 = _eta_squared(np.array(stretches, dtype=np.float64), heroes)
    subject = [int(k) for k in np.argsort(-np.abs(r), kind="stable")[:n]]
    hero = [int(k) for k in np.argsort(-eta2, kind="stable") if k not in subject][:n]
    return {
        "subject": [[k, round(float(r[k]), 3)] for k in subject],
        "hero": [[k, round(float(eta2[k]), 3)] for k in hero],
        "sentences": len(sentences),
        "stories": len(stretches),
        "layer": layer,
    }


def _group(title: str, found: list[list], stat: str, quantities: str) -> CellGroup:
    fmt = "{:+.2f}" if stat == "r" else "{:.2f}"
    labels = tuple(f"cell {k}  {stat} = {fmt.format(v)}" for k, v in found)
    return CellGroup(title, tuple(k for k, _ in found), labels, tuple(quantities))


def _words(analysis) -> list[int]:
    """The tokens that are not whitespace (the picture's columns)."""
    return [t for t, tok in enumerate(analysis.tokens) if tok.strip()]


def _first(analysis, text: str, start: int = 0) -> int:
    """The index of the token where ``text`` begins in the analysed text (at or after char
    ``start``)."""
    at = analysis.text.index(text, start)
    ends = np.cumsum([len(t) for t in analysis.tokens])
    return int(np.searchsorted(ends, at, side="right"))


def draw_pictures(model, out_dir, *, held: list[stories.Story] | None = None) -> dict:
    """Choose the cells (:func:`find_cells`) and write both pictures into ``out_dir``:
    ``switch.png``, ``switch.html``, ``blank.png``, ``blank.html`` and ``cells.json``. Returns
    ``{"switch": {"png", "html"}, "blank": {...}, "cells": {...}}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    held = held if held is not None else stories.held_out(HELD_OUT_SEED, PROBE_STORIES)
    layer = model.config.num_layers - 1  # the layer the output reads
    found = find_cells(model, held, layer=layer)
    rundir.atomic_write_json(out_dir / "cells.json", found)
    subject = _group("subject cells (whom the text is about)", found["subject"], "r", "cfi")
    hero = _group("hero cells (whom the story began with)", found["hero"], "η²", "cf")
    how = (
        f"Cells chosen by what they do on {found['stories']} held-out stories, where the text is "
        "about someone other than the hero: subject cells by r, the correlation of their cell "
        "state with the gender (+1 he, -1 she) of whom the sentence is about "
        f"({found['sentences']:,} sentences); hero cells by η², the share of their cell state's "
        "variance that the hero's name explains."
    )
    result: dict = {"cells": found}

    a = analyze(model, SWITCH_TEXT, top_k=8)
    second = SWITCH_TEXT.index("Mary")
    marks: tuple[tuple[int, str], ...] = (
        (_first(a, ". Dan"), "full stop"),
        (_first(a, "on the other hand"), "on the other hand"),
        (_first(a, ". Mary"), "full stop"),
        (_first(a, "on the other hand", second), "on the other hand"),
    )
    after_switch = _first(a, " She") if " She" in SWITCH_TEXT else None
    picture = plot_event(
        a,
        out_dir / "switch.png",
        groups=[subject, hero],
        title="“Bob is a nice person. Dan, on the other hand, is evil.”: the subject switch",
        subtitle=how,
        layer=layer,
        columns=_words(a),
        marks=marks,
        bars_at=after_switch,
        answer="She",
    )
    cells = [k for k, _ in found["subject"]] + [k for k, _ in found["hero"]]
    page = write_html(
        a,
        out_dir / "switch.html",
        layer=layer,
        cells=cells,
        quantity="c",
        focus=after_switch,
        title="The subject switch: " + SWITCH_TEXT[:54] + "…",
        notes="Subject cells: " + ", ".join(str(k) for k, _ in found["subject"]) + "; hero "
        "cells: " + ", ".join(str(k) for k, _ in found["hero"]) + ". " + how,
    )
    result["switch"] = {"png": picture["path"], "html": str(page), "text": SWITCH_TEXT}

    a = analyze(model, BLANK_TEXT, top_k=8)
    blank = len(a) - 1  # the space after "brave": its next token is the name
    marks = (
        (_first(a, "Dan"), "someone else"),
        (_first(a, "Mary"), "someone else"),
        (_first(a, "For"), "the blank's sentence"),
    )
    picture = plot_event(
        a,
        out_dir / "blank.png",
        groups=[hero, subject],
        title="“For his contributions, brave ____”: the name kept since the first sentence",
        subtitle=how,
        layer=layer,
        columns=_words(a),
        marks=marks,
        bars_at=blank,
        answer="Bob",
    )
    page = write_html(
        a,
        out_dir / "blank.html",
        layer=layer,
        cells=[k for k, _ in found["hero"]] + [k for k, _ in found["subject"]],
        quantity="c",
        focus=blank,
        title="The blank: …For his contributions, brave ____",
        notes="Hero cells: " + ", ".join(str(k) for k, _ in found["hero"]) + "; subject "
        "cells: " + ", ".join(str(k) for k, _ in found["subject"]) + ". " + how,
    )
    result["blank"] = {"png": picture["path"], "html": str(page), "text": BLANK_TEXT}
    result["blank"]["next_words"] = picture["bars"]
    rundir.atomic_write_json(out_dir / "pictures.json", result)
    return result


def load_cells(run_dir) -> tuple[int, list[int]] | None:
    """``(layer, cells)``: the cells ``glasslstm train`` chose for a stories model (subject
    cells, then hero cells), or None if it wrote none."""
    path = Path(run_dir) / "article" / "cells.json"
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text("utf-8"))
        return int(found["layer"]), [int(k) for k, _ in found["subject"] + found["hero"]]
    except (ValueError, KeyError, TypeError):
        return None

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def modules_after():
    """``run(code, names)``: runs ``code`` in a fresh interpreter and returns its standard
    output and which of the modules ``names`` it had imported by the end."""

    def run(code: str, names: tuple[str, ...]) -> tuple[str, list[str]]:
        code += f"\nprint('LOADED', json.dumps([m for m in {names!r} if m in sys.modules]))\n"
        out = subprocess.run(
            [sys.executable, "-c", "import json, sys\n" + code],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        head, _, loaded = out.rpartition("LOADED ")
        return head, json.loads(loaded)

    return run


STORY = (
    'Bob is a nice person. Dan, on the other hand, is evil. "Run," said Bob. '
    "Bob can swim. He served in the Navy for four long years (and more). "
    "For his contributions, brave Bob was given a medal.\n"
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A small char model trained for a few seconds on article-style text: a real run dir."""
    from glasslstm.data import Corpus
    from glasslstm.trainer import TrainConfig, train

    text = (STORY * 30).encode()
    cut = int(len(text) * 0.9)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(
        hidden=32,
        layers=2,
        dropout=0.0,
        seq_len=32,
        batch_size=8,
        max_steps=30,
        eval_every=30,
        warmup=2,
        lr=1e-2,
        out=str(out),
    )
    train(cfg, progress=False, corpus=Corpus("tiny", text[:cut], text[cut:], "test"))
    return out


@pytest.fixture(scope="session")
def stories_run(tmp_path_factory):
    """A small model trained for a few seconds on the built-in stories corpus (the article's
    world): a real run directory whose validation split is the stories' (the match text)."""
    from glasslstm.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "stories"
    cfg = TrainConfig(
        hidden=48,
        layers=2,
        dropout=0.0,
        seq_len=32,
        batch_size=32,
        max_steps=80,  # enough for cells that single out full stops, commas, "his"
        eval_every=80,
        eval_batches=2,
        warmup=10,
        lr=2e-2,
        out=str(out),
    )
    train(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def article_run(tmp_path_factory):
    """A small word-level model trained by the article's recipe on the built-in stories for a
    few seconds, with the article's cells and pictures drawn (on 30 held-out stories)."""
    from glasslstm import article, stories
    from glasslstm.inspection.article import draw_pictures
    from glasslstm.model import LanguageModel
    from glasslstm.trainer import train

    out = tmp_path_factory.mktemp("runs") / "stories"
    cfg = article.train_config(
        hidden=24,
        max_steps=24,
        curriculum=12,
        eval_every=24,
        eval_batches=2,
        batch_size=4,
        seq_len=64,
        out=str(out),
    )
    train(cfg, progress=False)
    pictures = draw_pictures(LanguageModel.load(out), out / "article", held=stories.held_out(1, 30))
    return out, pictures

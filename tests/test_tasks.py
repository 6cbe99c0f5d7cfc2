"""The long-term-memory tasks: layouts checked by hand, baselines, scoring, determinism."""

import math
import re

import pytest
import torch

from glasslstm.stories import FEMALE_NAMES, MALE_NAMES
from glasslstm.tasks import TASKS, AddingTask, CopyTask, SubjectTask, Task, make_task


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- adding
def test_adding_layout_T6():
    task = make_task("adding", 6)
    x, target, mask = task.batch(64, gen())
    assert mask is None and x.dtype == torch.float32 and x.shape == (64, 6, 2)
    assert target.shape == (64,)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(markers.unique().tolist()) == {0.0, 1.0}
    assert (markers[:, :3].sum(1) == 1).all() and (markers[:, 3:].sum(1) == 1).all()
    assert torch.equal(target, (values * markers).sum(1))
    # hand check of one row
    first, second = markers[0].nonzero().flatten().tolist()
    assert first < 3 <= second
    assert target[0].item() == pytest.approx(values[0, first].item() + values[0, second].item())


def test_adding_scoring():
    task = make_task("adding", 6)
    x, target, mask = task.batch(32, gen())
    pred = torch.randn(32, 6, 1)  # only the final step counts
    pred[:, -1, 0] = target
    assert task.loss(pred, target, mask).item() == 0.0
    metric = task.metric(pred, target, mask)
    assert metric == {"mse": 0.0, "accuracy": 1.0} and task.solved(metric)
    pred[:, -1, 0] += 0.05  # beyond H&S's 0.04 tolerance
    metric = task.metric(pred, target, mask)
    assert metric["accuracy"] == 0.0 and metric["mse"] == pytest.approx(0.0025, rel=1e-4)
    assert task.solved(metric)  # mse < 0.01


def test_adding_mean_predictor_is_the_baseline():
    task = make_task("adding", 10)
    assert task.baseline == pytest.approx(1 / 6)
    _, target, mask = task.batch(20000, gen(1))
    metric = task.metric(torch.ones(20000, 10, 1), target, mask)
    assert metric["mse"] == pytest.approx(1 / 6, abs=0.006)  # ~4 standard errors
    assert not task.solved(metric)


# ------------------------------------------------------------------------------- copy
def test_copy_layout_T5():
    task = make_task("copy", 5)
    assert (task.seq_len, task.input_size, task.output_size) == (25, 10, 9)
    x, target, mask = task.batch(16, gen())
    assert mask is None and x.shape == (16, 25, 10) and x.dtype == torch.float32
    assert target.shape == (16, 25) and target.dtype == torch.long
    assert (x.sum(-1) == 1).all()
    inp = x.argmax(-1)
    blank, delim = task.blank, task.delimiter
    assert (blank, delim) == (8, 9)
    assert (inp[:, :10] < 8).all()  # 10 symbols
    assert (inp[:, 10:14] == blank).all()  # T - 1 = 4 blanks
    assert (inp[:, 14] == delim).all()  # the delimiter at index 10 + T - 1
    assert (inp[:, 15:] == blank).all()  # 10 blanks while recalling
    assert (target[:, :15] == blank).all()
    assert torch.equal(target[:, 15:], inp[:, :10])


def test_copy_baseline_predictor_matches_formula():
    T = 5
    task = make_task("copy", T)
    x, target, mask = task.batch(8, gen())
    assert task.baseline == 10 * math.log(8) / (T + 20)
    # blank with probability 1 up to the delimiter, uniform over the 8 symbols afterwards
    pred = torch.full((8, T + 20, 9), -1e9, dtype=torch.float64)
    pred[:, : T + 10, task.blank] = 0.0
    pred[:, T + 10 :, :8] = 0.0
    direct = -torch.log_softmax(pred, -1).gather(-1, target.unsqueeze(-1)).mean()
    assert direct.item() == pytest.approx(10 * math.log(8) / (T + 20), rel=1e-12)
    assert task.loss(pred, target, mask).item() == pytest.approx(task.baseline, rel=1e-12)
    metric = task.metric(pred, target, mask)
    assert metric["loss"] == pytest.approx(task.baseline, rel=1e-12)
    assert not task.solved(metric)


def test_copy_perfect_predictor():
    task = make_task("copy", 5)
    x, target, mask = task.batch(8, gen())
    pred = 50.0 * torch.nn.functional.one_hot(target, 9).float()
    metric = task.metric(pred, target, mask)
    assert metric["loss"] < 1e-12 and metric["accuracy"] == 1.0 and task.solved(metric)
    pred[:, -1] = pred[:, -1].roll(1, dims=-1)  # the last recalled symbol wrong everywhere
    assert task.metric(pred, target, mask)["accuracy"] == pytest.approx(0.9)


# ------------------------------------------------------------------------------- subject
GENDERED = {
    "m": {"He", "he", "His", "his", "him"},  # ("an old man" is not a pronoun)
    "f": {"She", "she", "Her", "her"},
}


def gender(name):
    return "m" if name in MALE_NAMES else "f"


def test_subject_vocab_and_baseline():
    task = make_task("subject", 60)
    names = MALE_NAMES + FEMALE_NAMES
    assert task.vocab[: len(names)] == list(names) and task.output_size == len(names) == 64
    assert task.input_size == len(task.vocab) == len(set(task.vocab))
    assert not set(task.vocab[len(names) :]) & set(names)
    # chance: the pronoun gives the gender, then a uniform guess among that gender's names
    assert task.baseline == pytest.approx(0.5 / len(MALE_NAMES) + 0.5 / len(FEMALE_NAMES))
    assert task.baseline == pytest.approx(1 / 32)


@pytest.mark.parametrize("T", [None, 61, 200])  # None: the smallest allowed T
def test_subject_samples(T):
    task = make_task("subject", T or SubjectTask(100).min_T)
    T = task.T
    x, target, mask = task.batch(48, gen(T))
    ids, target2 = task.token_batch(48, gen(T))
    assert mask is None and x.shape == (48, T, task.input_size) and x.dtype == torch.float32
    assert torch.equal(x.argmax(-1), ids) and (x.sum(-1) == 1).all()
    assert torch.equal(target, target2) and target.dtype == torch.long
    n_names = len(MALE_NAMES) + len(FEMALE_NAMES)
    for row, hero_id in zip(ids.tolist(), target.tolist()):
        words = [task.vocab[i] for i in row]
        hero = task.vocab[hero_id]
        # the hero is the first token and nowhere else: exactly T tokens before the blank (index T)
        assert row[0] == hero_id and row.count(hero_id) == 1
        others = {w for w, i in zip(words, row) if i < n_names} - {hero}
        assert others, "at least one distractor"
        # the blank: "For his/her ... , brave", the pronoun agrees with the hero
        assert words[-5] == "For" and words[-2:] == [",", "brave"]
        assert words[-4] == ("his" if gender(hero) == "m" else "her")
        # every sentence's pronouns agree with its subject: the first name in it, else the last one
        subject = hero
        for sentence in " ".join(words[:-5]).split(" . "):
            named = [w for w in sentence.split() if w in task.vocab[:n_names]]
            subject = named[0] if named else subject
            assert not GENDERED["f" if gender(subject) == "m" else "m"] & set(sentence.split())
        assert re.fullmatch(r"[A-Z][a-z]+( ([A-Za-z]+|[,.]))+", task.decode(row))


def test_subject_decode_and_scoring():
    task = make_task("subject", 60)
    ids, target = task.token_batch(4, gen(3))
    text = task.decode(ids[0])
    assert text.split()[0] == task.decode(target[0]) == task.decode(int(target[0]))
    assert re.search(r"(\w+) , on the other hand , ", text)
    assert text.endswith(", brave")
    pred = torch.zeros(4, 60, 64)
    assert task.loss(pred, target, None).item() == pytest.approx(math.log(64))
    pred[torch.arange(4), -1, target] = 100.0
    metric = task.metric(pred, target, None)
    assert metric["accuracy"] == 1.0 and metric["loss"] < 1e-12 and task.solved(metric)
    pred[0, -1] = 0.0
    pred[0, -1, (target[0] + 1) % 64] = 1.0
    assert task.metric(pred, target, None)["accuracy"] == 0.75


# ------------------------------------------------------------------------------- all tasks
@pytest.mark.parametrize("name", TASKS)
def test_determinism_and_seeds(name):
    task = make_task(name, 50)
    assert isinstance(task, Task) and task.name == name
    a = task.batch(8, gen(7))
    b = task.batch(8, gen(7))
    c = task.batch(8, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (8, task.seq_len, task.input_size)
    g = gen(7)
    task.batch(8, g)
    assert not torch.equal(task.batch(8, g)[0], a[0])  # the generator advances


def test_make_task_errors():
    assert TASKS == ("adding", "copy", "subject")
    assert isinstance(make_task("adding", 2), AddingTask)
    assert isinstance(make_task("copy", 1), CopyTask)
    with pytest.raises(ValueError, match="unknown task 'add'.*adding, copy, subject"):
        make_task("add", 10)
    for name, bad in [
        ("adding", 1),
        ("adding", 0),
        ("copy", 0),
        ("copy", -3),
        ("adding", 10.0),
        ("copy", True),
        ("subject", "100"),
    ]:
        with pytest.raises(ValueError, match=f"{name} task: T must be an integer >= "):
            make_task(name, bad)
    min_T = SubjectTask(100).min_T
    with pytest.raises(ValueError, match=f">= {min_T}, got {min_T - 1}"):
        make_task("subject", min_T - 1)
    with pytest.raises(ValueError, match="batch_size"):
        make_task("copy", 5).batch(0, gen())

"""The AWD-LSTM recipe (Merity et al. 2017): NT-ASGD, variable BPTT, AR and TAR."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from glasslstm import trainer
from glasslstm.cli import main
from glasslstm.config import ModelConfig
from glasslstm.data import Corpus, TokenStream
from glasslstm.errors import ConfigError
from glasslstm.model import LanguageModel
from glasslstm.trainer import (
    ExponentialAverage,
    ParameterAverage,
    TrainConfig,
    bptt_length,
    lr_at,
    nonmonotone_trigger,
    train,
)

TEXT = (
    "Bob is a nice person. Dan, on the other hand, is evil. Bob can swim. "
    "He served in the Navy for four long years. For his contributions, brave Bob. "
) * 12
CORPUS = Corpus(
    "tiny",
    TEXT.encode()[: int(len(TEXT) * 0.9)],
    TEXT.encode()[int(len(TEXT) * 0.9) :],
    "test text",
)
TINY = dict(hidden=16, layers=1, dropout=0.0, seq_len=12, batch_size=4, log_every=1, warmup=0)


def config(tmp_path, name, **kw):
    return TrainConfig(**{**TINY, **kw, "out": str(tmp_path / name)})


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- AR and TAR


def test_ar_and_tar_are_the_penalties_on_the_top_layer_output():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=11, hidden_size=8, num_layers=2, dropout=0.4))
    model.train()
    x = torch.randint(0, 11, (3, 7))
    y = torch.randint(0, 11, (3, 7))
    seen = {}
    model.lstm.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[0]))
    model.head.register_forward_pre_hook(lambda m, i: seen.__setitem__("dropped", i[0]))

    torch.manual_seed(1)
    _, plain, _ = model(x, None, y)
    torch.manual_seed(1)
    _, loss, _, penalty = model(x, None, y, ar=2.0, tar=0.5)
    h, dropped = seen["h"], seen["dropped"]
    assert not torch.equal(h, dropped)  # dropout was on: AR and TAR see different tensors
    expected = 2.0 * dropped.pow(2).mean() + 0.5 * (h[:, 1:] - h[:, :-1]).pow(2).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    assert penalty.item() > 0
    assert torch.equal(loss, plain)  # the loss stays the cross-entropy; the penalty is beside it
    # each alone
    torch.manual_seed(1)
    ar_only = model(x, None, y, ar=2.0)[3]
    assert ar_only.item() == pytest.approx((2.0 * seen["dropped"].pow(2).mean()).item(), rel=1e-6)
    assert len(model(x, None, y)) == 3  # off: no penalty element


def test_ar_tar_enter_the_gradient_but_not_the_reported_losses(tmp_path, monkeypatch):
    evaluated = []
    real_evaluate = trainer.evaluate

    def spy(model, ids, **kw):
        res = real_evaluate(model, ids, **kw)
        evaluated.append(res["loss"])
        return res

    monkeypatch.setattr(trainer, "evaluate", spy)
    losses: dict[str, list[float]] = {"plain": [], "awd": []}
    for name, kw in {"plain": {}, "awd": {"ar": 3.0, "tar": 2.0}}.items():
        cfg = config(tmp_path, name, max_steps=2, eval_every=1, optimizer="sgd", lr=0.5, **kw)
        train(
            cfg,
            progress=False,
            corpus=CORPUS,
            on_step=lambda s, loss, n=name: losses[n].append(loss),
        )
    # step 1 starts from the same weights: the same cross-entropy is reported
    assert losses["awd"][0] == losses["plain"][0]
    # the penalty changed the update, so step 2 differs
    assert losses["awd"][1] != losses["plain"][1]
    # the last validation is the plain cross-entropy: re-evaluating the saved model (its
    # weights after step 2) gives the figure the run reported
    model = LanguageModel.load(tmp_path / "awd")
    again = real_evaluate(
        model, model.tokenizer.encode(CORPUS.val.decode()), batch_size=4, seq_len=12
    )
    assert again["loss"] == pytest.approx(evaluated[-1], rel=1e-6)


# ----------------------------------------------------------------------------- variable BPTT


def test_variable_bptt_lengths_follow_the_rule():
    lengths = np.array([bptt_length(7, step, 70) for step in range(20000)])
    assert lengths.min() >= 5 and lengths.max() <= 140
    short = lengths < 52  # bptt / 2 = 35 plus 3.4 sigma; bptt less 3.6 sigma
    assert 0.04 < short.mean() < 0.06  # probability 0.05 of the half window
    assert abs(lengths[~short].mean() - 69.5) < 0.2  # N(70, 5), truncated to an int
    assert abs(lengths[~short].std() - 5.0) < 0.2
    assert abs(lengths[short].mean() - 34.5) < 1.0
    assert [bptt_length(7, s, 70) for s in range(50)] == list(lengths[:50])  # repeatable
    assert [bptt_length(8, s, 70) for s in range(50)] != list(lengths[:50])
    assert min(bptt_length(1, s, 10) for s in range(2000)) == 5  # the floor is reached
    assert max(bptt_length(1, s, 10) for s in range(2000)) == 20  # and the ceiling


def test_variable_bptt_walks_the_stream_and_scales_the_learning_rate(tmp_path, monkeypatch):
    seen = []
    real_step = trainer._Run.step

    def spy(self, x, y, w, lr):
        seen.append((self.progress.step, x.clone(), y.clone(), lr, self.state is None))
        return real_step(self, x, y, w, lr)

    monkeypatch.setattr(trainer._Run, "step", spy)
    cfg = config(tmp_path, "vb", max_steps=40, eval_every=100, variable_bptt=True, lr=0.01)
    train(cfg, progress=False, corpus=CORPUS)
    ids = LanguageModel.load(tmp_path / "vb").tokenizer.encode(CORPUS.train.decode())
    rows = TokenStream(ids, 4, 12).rows
    pos, passes = 0, 0
    for step, x, y, lr, fresh in seen:
        if pos + 1 >= rows.shape[1]:
            pos, passes = 0, passes + 1
        want = min(bptt_length(cfg.seed, step, 12), rows.shape[1] - 1 - pos)
        assert x.shape == (4, want)
        assert torch.equal(x, rows[:, pos : pos + want])
        assert torch.equal(y, rows[:, pos + 1 : pos + 1 + want])
        assert lr == pytest.approx(lr_at(cfg, step) * want / 12)
        assert fresh == (pos == 0)  # the state restarts with each pass only
        pos += want
    assert passes >= 1 and len({x.shape[1] for _, x, *_ in seen}) > 3


@pytest.mark.parametrize("batching", ["random", "documents"])
def test_variable_bptt_needs_the_stream(batching):
    with pytest.raises(ConfigError, match="--variable-bptt.*--batching stream"):
        TrainConfig(variable_bptt=True, batching=batching)


def test_variable_bptt_needs_room_for_its_half_window():
    with pytest.raises(ConfigError, match="--variable-bptt.*--seq-len >= 10"):
        TrainConfig(variable_bptt=True, seq_len=8)


@pytest.mark.parametrize(
    ("key", "value"), [("ar", -1.0), ("tar", float("nan")), ("nonmono", 0), ("optimizer", "asgd")]
)
def test_bad_recipe_values_name_the_option(key, value):
    with pytest.raises(ConfigError, match="--" + key):
        TrainConfig(**{key: value})


# ----------------------------------------------------------------------------- NT-ASGD


def test_the_nonmonotone_trigger():
    losses = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1]
    fired = [nonmonotone_trigger(losses[:k], losses[k], 2) for k in range(len(losses))]
    # 3.1 is the first loss worse than the best before the last two (3.0)
    assert fired == [False, False, False, False, False, True]
    assert not nonmonotone_trigger([3.0, 9.0], 9.5, 2)  # too few validations yet
    assert nonmonotone_trigger([3.0, 9.0, 9.0], 3.01, 2)
    assert not nonmonotone_trigger([3.0, 9.0, 9.0], 2.99, 2)


def test_parameter_average_is_the_mean_of_the_iterates():
    p = torch.nn.Parameter(torch.zeros(3))
    avg = ParameterAverage([p])
    assert torch.equal(avg.mean[0], p.detach())  # before the first step: the weights themselves
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, -1.0]), torch.ones(3)]
    for v in values:
        with torch.no_grad():
            p.copy_(v)
        avg.update()
    assert torch.allclose(avg.mean[0], torch.stack(values).mean(0))
    with avg.applied():
        assert torch.allclose(p, torch.stack(values).mean(0))
    assert torch.equal(p.detach(), values[-1])


SCRIPT = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 3.0, 2.9, 2.8, 2.7]  # switch at the 6th validation


def scripted_evaluations(monkeypatch, done=0):
    """Make the trainer's validations return SCRIPT's losses from the ``done``-th on; returns
    the list that collects the weights each of them saw."""
    seen = []

    def evaluate(model, ids, **kw):
        seen.append(parameters(model))
        loss = SCRIPT[done + len(seen) - 1]
        return {"loss": loss, "perplexity": np.exp(loss), "bpc": loss, "tokens": 1}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    return seen


def scripted_run(tmp_path, monkeypatch, name, max_steps, on_step=None, **kw):
    """A ntasgd run whose validations return SCRIPT's losses (eval every 2 steps, nonmono 2);
    returns (result, the weights after each step, the weights each validation saw)."""
    kw = dict(optimizer="ntasgd", nonmono=2, lr=0.5, weight_decay=1e-4, **kw)
    return recorded_run(tmp_path, monkeypatch, name, max_steps, on_step, **kw)


def recorded_run(tmp_path, monkeypatch, name, max_steps, on_step=None, **kw):
    """A run (eval every 2 steps) whose validations return SCRIPT's losses; returns (result,
    the weights after each step, the weights each validation saw)."""
    after_step = {}
    real_step = trainer._Run.step

    def step(self, x, y, w, lr):
        after_step.setdefault(self.progress.step, parameters(self.model))  # 0: the initial ones
        out = real_step(self, x, y, w, lr)
        after_step[self.progress.step + 1] = parameters(self.model)
        return out

    monkeypatch.setattr(trainer._Run, "step", step)
    at_eval = scripted_evaluations(monkeypatch)
    cfg = config(tmp_path, name, max_steps=max_steps, eval_every=2, **kw)
    res = train(cfg, progress=False, corpus=CORPUS, on_step=on_step)
    return res, after_step, at_eval


def resume_scripted(run_dir, monkeypatch, done):
    """Resume ``run_dir``, whose first ``done`` validations already returned SCRIPT's losses,
    with the next ones; returns (result, the weights each new validation saw)."""
    seen = scripted_evaluations(monkeypatch, done)
    return train(resume=run_dir, progress=False, corpus=CORPUS), seen


def test_ntasgd_switches_when_the_criterion_says_and_evaluates_the_average(tmp_path, monkeypatch):
    res, after_step, at_eval = scripted_run(tmp_path, monkeypatch, "nt", 18)
    assert res.averaging_from == 12  # the 6th validation, after step 12
    assert "NT-ASGD averaged the weights from step 12" in res.message
    assert len(at_eval) == 9
    for k in range(6):  # before averaging: the training weights
        assert all(torch.equal(a, b) for a, b in zip(at_eval[k], after_step[2 * (k + 1)]))
    for k, step in zip(range(6, 9), (14, 16, 18)):  # then the mean of the steps since
        for i, seen in enumerate(at_eval[k]):
            mean = torch.stack([after_step[s][i] for s in range(13, step + 1)]).mean(0)
            assert torch.allclose(seen, mean, atol=1e-6)
        assert not all(torch.equal(a, b) for a, b in zip(at_eval[k], after_step[step]))
    # the best (the last validation, 2.8) and the latest saved models are the average
    for which in ("best", "last"):
        saved = LanguageModel.load(tmp_path / "nt", which=which).parameters()
        assert all(torch.allclose(a, b) for a, b in zip(saved, at_eval[8]))
    rows = [
        json.loads(line) for line in (tmp_path / "nt" / "metrics.jsonl").read_text().splitlines()
    ]
    averaged = [r["averaged"] for r in rows if r["split"] == "val"]
    assert averaged == [False] * 6 + [True] * 3


def test_ntasgd_resumed_continues_averaging(tmp_path, monkeypatch):
    full, _, full_evals = scripted_run(tmp_path, monkeypatch, "full", 18, variable_bptt=True)
    monkeypatch.undo()

    def ctrl_c_at_15(step, loss):
        if step == 15:
            os.kill(os.getpid(), signal.SIGINT)

    cut, _, cut_evals = scripted_run(
        tmp_path, monkeypatch, "cut", 18, on_step=ctrl_c_at_15, variable_bptt=True
    )
    assert cut.stopped == "interrupted" and cut.step == 15 and cut.averaging_from == 12
    state = json.loads((tmp_path / "cut" / "train_state.json").read_text())
    assert state["awd"]["averaging_from"] == 12 and state["awd"]["average_count"] == 3
    resumed, resumed_evals = resume_scripted(tmp_path / "cut", monkeypatch, len(cut_evals))
    assert resumed.step == 18 and resumed.averaging_from == 12
    for seen, want in zip(cut_evals + resumed_evals, full_evals):
        assert all(torch.equal(a, b) for a, b in zip(seen, want))
    assert len(cut_evals) + len(resumed_evals) == len(full_evals)


# ----------------------------------------------------------------------------- --ema


def test_exponential_average_starts_short_then_keeps_its_decay():
    p = torch.nn.Parameter(torch.zeros(2))
    avg = ExponentialAverage([p], decay=0.9)
    want = torch.zeros(2)
    values = torch.randn(120, 2, generator=torch.Generator().manual_seed(0))
    for n, v in enumerate(values, 1):
        with torch.no_grad():
            p.copy_(v)
        avg.update()
        keep = min(0.9, (1 + n) / (10 + n))  # 2/11 of the initial weights after one step
        want = keep * want + (1 - keep) * v
        assert torch.allclose(avg.mean[0], want, atol=1e-6)
    assert avg.count == 120
    with avg.applied():
        assert torch.allclose(p, want, atol=1e-6)
    assert torch.equal(p.detach(), values[-1])


def expected_ema(after_step, decay, upto):
    """The moving average of the weights after steps 1..upto, from the initial ones."""
    mean = [t.clone() for t in after_step[0]]
    for n in range(1, upto + 1):
        keep = min(decay, (1 + n) / (10 + n))
        mean = [keep * m + (1 - keep) * w for m, w in zip(mean, after_step[n])]
    return mean


def test_ema_run_validates_and_saves_the_moving_average(tmp_path, monkeypatch):
    res, after_step, at_eval = recorded_run(tmp_path, monkeypatch, "ema", 10, ema=0.5, lr=0.01)
    assert res.averaging_from == 0 and "moving average (--ema 0.5)" in res.message
    assert len(at_eval) == 5
    for k, step in enumerate((2, 4, 6, 8, 10)):
        for seen, want in zip(at_eval[k], expected_ema(after_step, 0.5, step)):
            assert torch.allclose(seen, want, atol=1e-6)
        assert not all(torch.equal(a, b) for a, b in zip(at_eval[k], after_step[step]))
    # best: the third validation (SCRIPT's 3.0); latest: the last; both the average
    for which, k in (("best", 2), ("last", 4)):
        saved = LanguageModel.load(tmp_path / "ema", which=which).parameters()
        assert all(torch.allclose(a, b) for a, b in zip(saved, at_eval[k]))
    rows = [
        json.loads(line) for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["averaged"] for r in rows if r["split"] == "val"] == [True] * 5


def test_ema_resumed_continues_the_average(tmp_path, monkeypatch):
    _, _, full_evals = recorded_run(tmp_path, monkeypatch, "full", 10, ema=0.6, lr=0.01)
    monkeypatch.undo()

    def ctrl_c_at_5(step, loss):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    cut, _, cut_evals = recorded_run(
        tmp_path, monkeypatch, "cut", 10, on_step=ctrl_c_at_5, ema=0.6, lr=0.01
    )
    assert cut.stopped == "interrupted" and cut.step == 5
    state = json.loads((tmp_path / "cut" / "train_state.json").read_text())
    assert state["awd"]["average_count"] == 5
    resumed, resumed_evals = resume_scripted(tmp_path / "cut", monkeypatch, len(cut_evals))
    assert resumed.step == 10
    assert len(cut_evals) + len(resumed_evals) == len(full_evals) == 5
    for seen, want in zip(cut_evals + resumed_evals, full_evals):
        assert all(torch.equal(a, b) for a, b in zip(seen, want))


def test_ema_options_are_checked():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="--ema"):
            TrainConfig(ema=bad)
    with pytest.raises(ConfigError, match="--ema 0.99 and --optimizer ntasgd"):
        TrainConfig(ema=0.99, optimizer="ntasgd", lr=30.0)
    assert TrainConfig(ema=0.999, optimizer="sgd").ema == 0.999


# ----------------------------------------------------------------------------- the command


def test_train_command_with_the_whole_recipe(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text(TEXT)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--json"]
    args += ["--hidden", "16", "--layers", "1", "--seq-len", "12", "--batch-size", "4"]
    args += ["--max-steps", "8", "--eval-every", "1", "--warmup", "0", "--nonmono", "1"]
    args += ["--optimizer", "ntasgd", "--lr", "1", "--variable-bptt", "--ar", "2", "--tar", "1"]
    args += ["--weight-decay", "0"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 8 and report["stopped"] == "max_steps"
    assert "averaging_from" in report
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert config["optimizer"] == "ntasgd" and config["variable_bptt"] is True
    assert (config["ar"], config["tar"], config["nonmono"]) == (2.0, 1.0, 1)


def test_ntasgd_without_an_sgd_learning_rate_is_refused():
    with pytest.raises(ConfigError, match="--optimizer ntasgd .* Give --lr"):
        TrainConfig(level="word", optimizer="ntasgd")
    assert TrainConfig(level="word", optimizer="ntasgd", lr=30.0).lr == 30.0

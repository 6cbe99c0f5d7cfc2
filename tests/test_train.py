"""train(): exact resume, divergence, budgets, early stopping, the run directory."""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import replace

import pytest
import torch

from glasslstm import rundir
from glasslstm.config import LEVEL_DEFAULTS
from glasslstm.data import Corpus, DataError
from glasslstm.model import ConfigError, LanguageModel
from glasslstm.trainer import TrainConfig, evaluate, lr_at, train

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
TINY = dict(
    hidden=24, layers=2, dropout=0.1, seq_len=16, batch_size=4, eval_every=8, log_every=4, warmup=2
)


def run(tmp_path, name, corpus=CORPUS, **kw):
    cfg = TrainConfig(**{**TINY, **kw, "out": str(tmp_path / name)})
    return train(cfg, progress=False, corpus=corpus)


def weights(run_dir, which="last"):
    return LanguageModel.load(run_dir, which=which).state_dict()


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    full = run(tmp_path, "full", max_steps=24)
    assert full.stopped == "max_steps" and full.step == 24

    def ctrl_c_at_11(step, loss):
        if step == 11:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; handled between steps

    cfg = TrainConfig(**{**TINY, "max_steps": 24, "out": str(tmp_path / "cut")})
    cut = train(cfg, progress=False, corpus=CORPUS, on_step=ctrl_c_at_11)
    assert cut.stopped == "interrupted" and cut.step == 11
    assert "glasslstm train --resume" in cut.message
    resumed = train(resume=tmp_path / "cut", progress=False, corpus=CORPUS)
    assert resumed.step == 24 and resumed.stopped == "max_steps"
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.best_val_loss == full.best_val_loss


@pytest.mark.slow
def test_random_batching_resumes_exactly_too(tmp_path):
    full = run(tmp_path, "full", max_steps=16, batching="random")

    def ctrl_c_at_5(step, loss):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = TrainConfig(
        **{**TINY, "max_steps": 16, "batching": "random", "out": str(tmp_path / "cut")}
    )
    assert train(cfg, progress=False, corpus=CORPUS, on_step=ctrl_c_at_5).step == 5
    train(resume=tmp_path / "cut", progress=False, corpus=CORPUS)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a) and full.step == 16


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    run(tmp_path, "a", max_steps=6)
    run(tmp_path, "b", max_steps=6)
    run(tmp_path, "c", max_steps=6, seed=7)
    a, b, c = (weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lstm.weight_hh_l0"], c["lstm.weight_hh_l0"])


def test_run_directory_describes_itself(tmp_path):
    res = run(tmp_path, "r", max_steps=16)
    d = res.run_dir
    cfg = rundir.read_config(d)
    assert cfg["format_version"] == rundir.FORMAT_VERSION and cfg["kind"] == rundir.RUN_KIND
    assert cfg["train"]["hidden"] == 24 and cfg["model"]["vocab_size"] > 10
    assert json.loads((d / "vocab.json").read_text())["level"] == "char"
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["split"] == "val"]
    trains = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in vals] == [8, 16] and len(trains) == 4
    for r in vals:
        assert r["bpc"] == pytest.approx(r["loss"] / math.log(2))
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert all(r["tokens_per_s"] > 0 for r in trains)
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (d / "best" / "model.safetensors").is_file()
    assert res.best_val_loss == min(r["loss"] for r in vals)
    assert rundir.load_train_state(d)[1]["step"] == 16


def test_learning_happens(tmp_path):
    res = run(tmp_path, "learn", max_steps=60, lr=1e-2, eval_every=30)
    vals = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    first_train = next(r for r in vals if r["split"] == "train")
    assert res.last_val_loss < first_train["loss"] - 0.5


@pytest.mark.slow
def test_bf16_precision_trains_and_can_be_switched_on_resume(tmp_path):
    """--precision bf16: autocast around the forward (bf16 matrix products, float32 LSTM state
    and loss); it learns like float32 and, not defining the model, may change on resume."""
    res = run(tmp_path, "bf16", max_steps=60, lr=1e-2, eval_every=30, precision="bf16")
    fp32 = run(tmp_path, "fp32", max_steps=60, lr=1e-2, eval_every=30)
    vals = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    first_train = next(r for r in vals if r["split"] == "train")
    assert res.last_val_loss < first_train["loss"] - 0.5
    assert res.last_val_loss == pytest.approx(fp32.last_val_loss, rel=0.05)
    assert res.last_val_loss != fp32.last_val_loss  # the bf16 products did run
    assert rundir.read_config(res.run_dir)["train"]["precision"] == "bf16"
    more = train(
        resume=res.run_dir,
        overrides={"max_steps": 64, "precision": "fp32"},
        progress=False,
        corpus=CORPUS,
    )
    assert more.step == 64 and more.stopped == "max_steps"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, bad):
    """The 13th training loss comes out NaN/Inf: that step is not applied, the run stops."""
    original, calls = torch.nn.functional.cross_entropy, []

    def failing_cross_entropy(*args, **kwargs):
        loss = original(*args, **kwargs)
        if torch.is_grad_enabled():  # training steps, not validation
            calls.append(1)
            if len(calls) == 13:
                return loss * bad
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", failing_cross_entropy)
    cfg = TrainConfig(**{**TINY, "max_steps": 50, "out": str(tmp_path / "nan")})
    res = train(cfg, progress=False, corpus=CORPUS)
    assert res.stopped == "diverged" and res.step == 12
    assert "diverged" in res.message and "last good checkpoint" in res.message
    tensors, meta = rundir.load_train_state(res.run_dir)
    saved = LanguageModel.load(res.run_dir, which="last")
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))
    assert meta["step"] <= res.step and f"(step {meta['step']})" in res.message


def test_time_budget_stops_early_and_still_saves(tmp_path):
    res = run(tmp_path, "budget", max_steps=10_000, time_budget=1e-6)
    assert res.stopped == "time_budget" and res.step == 1
    assert rundir.load_train_state(res.run_dir)[1]["step"] == 1
    assert math.isfinite(res.last_val_loss)


def test_a_time_budget_without_max_steps_trains_for_the_budget(tmp_path):
    res = run(tmp_path, "budget", time_budget=1e-6)  # no --max-steps: the budget alone
    assert res.stopped == "time_budget" and res.step == 1
    cfg = TrainConfig(time_budget=100.0, warmup=0)
    assert cfg.max_steps == 0  # no step limit
    assert lr_at(cfg, 100_000, 0.0) == cfg.lr  # steps alone do not anneal it
    floor = cfg.lr * cfg.min_lr_ratio
    assert lr_at(cfg, 10, 50.0) == pytest.approx((cfg.lr + floor) / 2)
    assert lr_at(cfg, 10, 100.0) == pytest.approx(floor)
    assert TrainConfig(time_budget=100.0, max_steps=7).max_steps == 7
    with pytest.raises(ConfigError, match=r"--max-steps 0 .*needs --time-budget"):
        TrainConfig(max_steps=0)


def test_options_left_out_take_their_levels_defaults():
    for level, defaults in LEVEL_DEFAULTS.items():
        cfg = TrainConfig(level=level)
        assert {key: getattr(cfg, key) for key in defaults} == defaults, level
    assert LEVEL_DEFAULTS["word"] != LEVEL_DEFAULTS["char"]
    word = TrainConfig(level="word", hidden=64, tie_weights=False)  # what is given wins
    assert (word.hidden, word.tie_weights) == (64, False)
    assert word.seq_len == LEVEL_DEFAULTS["word"]["seq_len"]
    with pytest.raises(ConfigError, match="--level='bpe' is not valid"):
        TrainConfig(level="bpe")


def test_split_options_are_checked_together():
    with pytest.raises(ConfigError, match="both name the training text"):
        TrainConfig(data="a.txt", train="b.txt")
    with pytest.raises(ConfigError, match="--test needs --train"):
        TrainConfig(test="t.txt")
    with pytest.raises(ConfigError, match="--valid needs --train"):
        TrainConfig(valid="v.txt", test="t.txt")


def test_split_files_are_used_as_such_and_the_best_model_is_scored_on_test(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text(TEXT)
    (folder / "valid.txt").write_text(TEXT[:500])
    test_text = "Zed is new here. " + TEXT[:400]  # Z: a character training never had
    (folder / "test.txt").write_text(test_text)
    cfg = TrainConfig(**{**TINY, "max_steps": 16}, data=str(folder), out=str(tmp_path / "r"))
    res = train(cfg, progress=False)
    files = {s: str((folder / f"{s}.txt").resolve()) for s in ("train", "valid", "test")}
    assert res.files == files
    config = json.loads((res.run_dir / "config.json").read_text())
    assert config["corpus"]["files"] == files
    assert config["corpus"]["val_tokens"] == 500  # the validation file, not a cut of train
    assert config["corpus"]["test_tokens"] == len(test_text)
    # the vocabulary is the training split's: Z is the unknown symbol
    model = LanguageModel.load(res.run_dir)  # the best model
    tok = model.tokenizer
    assert "Z" not in tok.chars and sorted(set(TEXT)) == tok.chars
    assert res.test["unknown"] == test_text.count("Z") == 1
    # the figures are the best model's on the test file, also in metrics.jsonl
    ids = tok.encode_bytes(test_text.encode())
    expected = evaluate(model, ids, batch_size=TINY["batch_size"], seq_len=TINY["seq_len"])
    assert res.test["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert res.test["bpc"] == pytest.approx(expected["loss"] / math.log(2), rel=1e-5)
    assert res.test["perplexity"] == pytest.approx(math.exp(expected["loss"]), rel=1e-5)
    assert res.test["tokens"] == expected["tokens"]
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["split"] == "test"] == [{"split": "test", "step": 16, **res.test}]


@pytest.mark.slow
def test_a_split_file_run_resumes_from_its_files_new_place(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    for name, text in (("a.txt", TEXT), ("b.txt", TEXT[:300]), ("c.txt", TEXT[:200])):
        (old / name).write_text(text)
    files = {"train": old / "a.txt", "valid": old / "b.txt", "test": old / "c.txt"}
    cfg = TrainConfig(**{**TINY, "max_steps": 4}, **{k: str(v) for k, v in files.items()})
    first = train(replace(cfg, out=str(tmp_path / "r")), progress=False)
    old.rename(new)
    with pytest.raises(DataError, match=r"is not there any more.*--train NEW_PATH"):
        train(resume=first.run_dir, overrides={"max_steps": 8}, progress=False)
    moved = {k: str(new / v.name) for k, v in files.items()}
    res = train(resume=first.run_dir, overrides={"max_steps": 8, **moved}, progress=False)
    assert res.step == 8 and res.files == moved and res.test["tokens"] > 0
    config = json.loads((first.run_dir / "config.json").read_text())
    assert config["corpus"]["files"] == moved and config["train"]["test"] == moved["test"]
    (new / "c.txt").write_text(TEXT[:201])  # another test text: not the run's corpus
    with pytest.raises(DataError, match="SHA-256 differs"):
        train(resume=first.run_dir, overrides={"max_steps": 9}, progress=False)


def test_no_test_split_no_test_figures(tmp_path):
    res = run(tmp_path, "plain", max_steps=2)
    assert res.test is None and res.files == {}


def test_early_stopping_when_validation_stops_improving(tmp_path):
    res = run(
        tmp_path,
        "patience",
        max_steps=100,
        optimizer="sgd",
        momentum=0.0,
        lr=1e-30,
        warmup=0,
        schedule="constant",
        patience=1,
        dropout=0.0,
    )
    assert (
        res.stopped == "early_stopping" and res.step == 16
    )  # evals at 8 (best) and 16 (not better)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55)
    assert lr_at(cfg, 110) == pytest.approx(0.1)
    assert lr_at(TrainConfig(lr=0.5, warmup=0, schedule="constant"), 77) == 0.5


def test_run_directory_is_never_clobbered(tmp_path):
    run(tmp_path, "taken", max_steps=2)
    with pytest.raises(rundir.RunDirError, match="already exists.*--resume"):
        run(tmp_path, "taken", max_steps=2)


def test_resume_refuses_to_change_the_model(tmp_path):
    run(tmp_path, "r", max_steps=2)
    with pytest.raises(ConfigError, match="--hidden cannot change when resuming"):
        train(resume=tmp_path / "r", overrides={"hidden": 64}, progress=False, corpus=CORPUS)
    more = train(resume=tmp_path / "r", overrides={"max_steps": 4}, progress=False, corpus=CORPUS)
    assert more.step == 4


def test_corpus_shorter_than_one_batch(tmp_path):
    small = Corpus("small", b"abcdefghij" * 3, b"abcdefghij", "test")
    with pytest.raises(DataError, match="too few for one batch.*--batch-size"):
        run(tmp_path, "small", corpus=small, max_steps=2)


@pytest.mark.parametrize(
    "key,value",
    [
        ("level", "morse"),
        ("optimizer", "adam2"),
        ("lr", -1.0),
        ("seq_len", 0),
        ("precision", "fp8"),
    ],
)
def test_bad_config_values(key, value):
    with pytest.raises(ConfigError, match=f"--{key.replace('_', '-')}"):
        TrainConfig(**{key: value})


@pytest.mark.gpu
def test_trains_on_cuda_and_loads_on_cpu(tmp_path):
    res = run(tmp_path, "cuda", max_steps=12, device="cuda")
    assert res.step == 12 and math.isfinite(res.best_val_loss)
    model = LanguageModel.load(res.run_dir, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    assert len("".join(model.generate("Bob", length=5, seed=1))) == 5

"""Damaged or edited run directories: every file checked before use, one line naming the file,
the key, what was found and what was expected; nothing in the run directory changed by the
failed command, and the run loads again once the damaged file is restored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glasslstm import rundir
from glasslstm.cli import main
from glasslstm.errors import RunDirError
from glasslstm.model import LanguageModel
from glasslstm.trainer import TrainConfig, train

TEXT = (
    "Bob is a nice person. Dan, on the other hand, is evil. Bob can swim. "
    "He served in the Navy for four long years. For his contributions, brave Bob. "
) * 12
SMALL = dict(
    hidden=16, layers=2, dropout=0.0, seq_len=16, batch_size=4, warmup=2, eval_every=4, log_every=2
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small run trained from a text file, so that it also resumes from the command line."""
    root = tmp_path_factory.mktemp("runfiles")
    text = root / "text.txt"
    text.write_text(TEXT)
    out = root / "run"
    train(TrainConfig(data=str(text), max_steps=8, out=str(out), **SMALL), progress=False)
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(trained, d)
    return d


def snapshot(d: Path) -> dict:
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def error_line(capsys, command: str) -> str:
    lines = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        if not line.startswith(("glasslstm: resuming", "glasslstm: training"))
    ]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"glasslstm {command}: error: ") and "Traceback" not in lines[0]
    return lines[0]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, change, meta_change=None) -> None:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    if meta_change is not None:
        meta = json.loads(metadata["meta"])
        meta_change(meta)
        metadata["meta"] = json.dumps(meta)
    save_file(tensors, path, metadata=metadata)


# ------------------------------------------------------------------------ config.json

CONFIG_CASES = [
    (
        lambda c: c["model"].update(dropout="x"),
        "'model.dropout' is \"x\"; expected a finite number",
    ),
    (lambda c: c["model"].update(forget_bias="abc"), "'model.forget_bias' is \"abc\""),
    (lambda c: c["model"].update(hidden_size=True), "'model.hidden_size' is true; expected an int"),
    (lambda c: c["model"].update(embed_size=-1), "'model.embed_size' is -1; expected an int >= 0"),
    (
        lambda c: c["model"].update(tie_weights="yes"),
        "'model.tie_weights' is \"yes\"; expected true",
    ),
    (lambda c: c.pop("model"), "'model' is missing; expected the model section"),
    (lambda c: c["model"].pop("vocab_size"), "'model.vocab_size' is missing"),
    (lambda c: c["model"].update(extra=1), "unknown model config keys ['extra']"),
    (lambda c: c["train"].update(seed=2**70), "'train.seed' is 1180591620717411303424"),
    (lambda c: c["train"].update(dropout=0.5), "'model.dropout' is 0.0 but 'train.dropout' is 0.5"),
    (lambda c: c["corpus"].pop("name"), "'corpus.name' is missing"),
    (lambda c: c.update(train=[1]), "'train' is [1]; expected an object"),
]


@pytest.mark.parametrize("change,message", CONFIG_CASES)
def test_config_values_of_the_wrong_type_or_range(run_dir, capsys, change, message):
    before = snapshot(run_dir)
    edit_json(run_dir / "config.json", change)
    damaged = snapshot(run_dir)
    assert main(["sample", str(run_dir), "--length", "3"]) == 2
    line = error_line(capsys, "sample")
    assert f"{run_dir / 'config.json'}: " in line and message in line
    assert "restore it from a copy" in line
    assert snapshot(run_dir) == damaged  # the failed command wrote nothing
    (run_dir / "config.json").write_bytes(before[Path("config.json")])
    LanguageModel.load(run_dir)  # restored: it loads


def test_config_nested_beyond_the_parser(run_dir, capsys):
    (run_dir / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["predict", str(run_dir), "Bob"]) == 2
    assert "config.json is nested too deeply to read" in error_line(capsys, "predict")


def test_json_files_larger_than_any_glasslstm_writes(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(rundir, "MAX_JSON_BYTES", 100)
    assert main(["predict", str(run_dir), "Bob"]) == 2
    line = error_line(capsys, "predict")
    assert "config.json is" in line and "bytes, more than any glasslstm file" in line


# ------------------------------------------------------------------------ vocab.json


@pytest.mark.parametrize(
    "content,message",
    [
        (lambda v: {**v, "chars": v["chars"][:-1], "vocab_size": len(v["chars"]) - 1}, "lists"),
        (lambda v: {**v, "chars": ["a", "a"], "vocab_size": 2}, "distinct single characters"),
        (lambda v: {**v, "level": "morse"}, "unknown level 'morse'"),
        (lambda v: "[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ],
)
def test_vocabulary_damaged(run_dir, capsys, content, message):
    path = run_dir / "vocab.json"
    new = content(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    assert main(["sample", str(run_dir), "--length", "3"]) == 2
    line = error_line(capsys, "sample")
    assert str(path) in line and message in line


# ------------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda w: w.update({"head.bias": torch.zeros(7)}),
            "tensor 'head.bias' has shape (7,); expected ",
        ),
        (
            lambda w: w.update({"head.weight": w["head.weight"].long()}),
            "tensor 'head.weight' has dtype I64; expected F16 or BF16 or F32 or F64",
        ),
        (
            lambda w: w["lstm.weight_hh_l1"].view(-1).__setitem__(3, float("nan")),
            "tensor 'lstm.weight_hh_l1' has 1 NaN or infinite value of 1,024",
        ),
        (lambda w: w.pop("lstm.bias_ih_l0"), "tensor 'lstm.bias_ih_l0' is missing"),
        (lambda w: w.update({"extra": torch.zeros(1)}), "tensor 'extra' is not part of"),
    ],
)
def test_weights_that_do_not_fit_the_config(run_dir, capsys, change, message):
    path = run_dir / "model.safetensors"
    original = path.read_bytes()
    edit_tensors(path, change)
    damaged = snapshot(run_dir)
    assert main(["sample", str(run_dir), "--which", "last", "--length", "3"]) == 2
    line = error_line(capsys, "sample")
    assert f"{path}: {message}" in line
    assert snapshot(run_dir) == damaged
    path.write_bytes(original)
    LanguageModel.load(run_dir, which="last")


def test_broken_best_weights_point_at_the_latest(run_dir, capsys):
    edit_tensors(run_dir / "best" / "model.safetensors", lambda w: w.update(extra=torch.ones(1)))
    assert main(["sample", str(run_dir), "--length", "3"]) == 2
    assert "load the latest weights instead (--which last)" in error_line(capsys, "sample")
    assert main(["sample", str(run_dir), "--which", "last", "--length", "3"]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "{run}"],
        ["predict", "{run}", "Bob"],
        ["inspect", "{run}", "--text", "Bob"],
        ["cells", "{run}", "--data", "stories"],
        pytest.param(["serve", "{run}", "--port", "0"], marks=pytest.mark.slow),  # imports uvicorn
    ],
)
def test_every_command_reads_through_the_checks(run_dir, capsys, argv):
    edit_tensors(run_dir / "best" / "model.safetensors", lambda w: w.update(extra=torch.ones(1)))
    argv = [a.replace("{run}", str(run_dir)) for a in argv]
    assert main(argv) == 2
    assert "tensor 'extra' is not part of" in error_line(capsys, argv[0])


def test_loading_checks_the_header_before_reading_tensors(run_dir, monkeypatch):
    edit_tensors(run_dir / "model.safetensors", lambda w: w.update({"head.bias": torch.zeros(7)}))

    def never(*a, **k):
        raise AssertionError("tensors were loaded before their shapes were checked")

    monkeypatch.setattr(rundir, "load_tensors", never)
    with pytest.raises(RunDirError, match="has shape"):
        LanguageModel.load(run_dir, which="last")


# ------------------------------------------------------------------------ the resume point

STATE_CASES = [
    (
        lambda w: w.update({"state.0.exp_avg": torch.zeros(3)}),
        None,
        "tensor 'state.0.exp_avg' has shape (3,); expected ",
    ),
    (
        lambda w: w.update({"rng.torch_cpu": torch.zeros(100, dtype=torch.uint8)}),
        None,
        "the torch generator refuses it",
    ),
    (
        lambda w: w.update({"rng.python": torch.zeros(10, dtype=torch.int64)}),
        None,
        "the python generator refuses it",
    ),
    (
        lambda w: w.update({"carry.h": torch.zeros(2, 3, 16)}),
        None,
        "tensor 'carry.h' has shape (2, 3, 16); expected (2, 4, 16)",
    ),
    (
        lambda w: w["model.head.bias"].__setitem__(0, float("inf")),
        None,
        "tensor 'model.head.bias' has 1 NaN or infinite value",
    ),
    (lambda w: None, lambda m: m.pop("step"), "'meta.step' is missing; expected an int >= 0"),
    (lambda w: None, lambda m: m.update(step="7"), "'meta.step' is \"7\"; expected an int >= 0"),
    (
        lambda w: None,
        lambda m: m["optimizer"]["param_groups"][0].update(lr="x"),
        "'meta.optimizer.param_groups.0.lr' is \"x\"",
    ),
    (
        lambda w: None,
        lambda m: m["optimizer"]["param_groups"][0].update(params=[0, 1]),
        "'meta.optimizer.param_groups.0.params' is [0, 1]",
    ),
]


@pytest.mark.parametrize("change,meta_change,message", STATE_CASES)
def test_resume_point_checked_before_any_step(run_dir, capsys, change, meta_change, message):
    path = run_dir / "train_state.safetensors"
    edit_tensors(path, change, meta_change)
    damaged = snapshot(run_dir)
    assert main(["train", "--resume", str(run_dir), "--max-steps", "12", "--quiet"]) == 2
    line = error_line(capsys, "train")
    assert str(path) in line and message in line, line
    assert snapshot(run_dir) == damaged  # no step ran, nothing was written
    LanguageModel.load(run_dir)  # the model itself is fine


@pytest.mark.slow
def test_restored_resume_point_resumes(run_dir, capsys):
    path = run_dir / "train_state.safetensors"
    original = path.read_bytes()
    edit_tensors(path, lambda w: w.update({"state.0.exp_avg": torch.zeros(3)}))
    assert main(["train", "--resume", str(run_dir), "--max-steps", "12", "--quiet"]) == 2
    capsys.readouterr()
    path.write_bytes(original)
    assert main(["train", "--resume", str(run_dir), "--max-steps", "12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 12


# ------------------------------------------------------------------------ where the text is


@pytest.mark.slow
def test_a_relative_data_path_works_from_anywhere_and_can_move(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "small.txt").write_text(TEXT)
    args = ["--hidden", "16", "--layers", "1", "--seq-len", "16", "--batch-size", "4"]
    args += ["--eval-every", "4", "--warmup", "2", "--quiet"]
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", "--data", "small.txt", *args, "--max-steps", "4", "--out", "run"]) == 0
    run = tmp_path / "a" / "run"
    assert json.loads((run / "config.json").read_text())["train"]["data"] == str(
        tmp_path / "a" / "small.txt"
    )
    monkeypatch.chdir(tmp_path / "b")  # somewhere else: the run still finds its text
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--quiet"]) == 0
    assert main(["eval", str(run), "--json"]) == 0
    capsys.readouterr()

    moved = tmp_path / "b" / "moved.txt"
    (tmp_path / "a" / "small.txt").rename(moved)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--max-steps", "8", "--quiet"]) == 2
    line = error_line(capsys, "train")
    gone = tmp_path / "a" / "small.txt"
    assert f"the training text of {run}, {gone}, is not there any more" in line
    assert f"if it moved, resume with `glasslstm train --resume {run} --data NEW_PATH`" in line
    assert main(["eval", str(run)]) == 2
    assert f"give it with `glasslstm eval {run} --data PATH`" in error_line(capsys, "eval")
    assert snapshot(run) == before

    other = tmp_path / "b" / "other.txt"
    other.write_text(TEXT.replace("Bob", "Dan"))
    assert main(["train", "--resume", str(run), "--data", str(other), "--max-steps", "8"]) == 2
    assert "is not the text the run in" in error_line(capsys, "train")
    assert snapshot(run) == before

    assert main(["train", "--resume", str(run), "--data", "moved.txt", "--max-steps", "8"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["data"] == str(moved)
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0  # the new place is remembered
    assert "validation split" in json.loads(capsys.readouterr().out)["data"]

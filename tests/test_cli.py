"""The command line, in process (main([...])) and once through the installed console script."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from glasslstm.cli import main
from glasslstm.config import LEVEL_DEFAULTS
from glasslstm.model import LanguageModel

TEXT = (
    "Bob is a nice person. Dan, on the other hand, is evil. Bob can swim. "
    "He served in the Navy for four long years. For his contributions, brave Bob. "
) * 14
SMALL = [
    "--hidden",
    "24",
    "--layers",
    "1",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--eval-every",
    "10",
    "--warmup",
    "2",
]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def trained(tmp_path, corpus_file, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(corpus_file),
                *SMALL,
                "--max-steps",
                "20",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    return out, report


def test_train_json_report(trained):
    out, report = trained
    assert report["run_dir"] == str(out) and report["step"] == 20
    assert report["stopped"] == "max_steps"
    assert report["last_val_bpc"] == pytest.approx(report["last_val_loss"] / math.log(2))
    assert isinstance(report["sample"], str) and len(report["sample"]) > 0
    assert report["fill_in"][0]["prompt"] == "For his contributions, brave"


def test_train_human_report(tmp_path, corpus_file, capsys):
    out = tmp_path / "human"
    assert (
        main(
            [
                "train",
                "--data",
                str(corpus_file),
                *SMALL,
                "--max-steps",
                "10",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "bits per character" in text and "sample (temperature 0.8" in text
    assert "fill in the blank" in text and f"glasslstm sample {out}" in text


def test_sample_streams_the_prompt_and_continuation(trained, capsys):
    out, _ = trained
    assert main(["sample", str(out), "--prompt", "Bob ", "--length", "40", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Bob ") and len(first.rstrip("\n")) == 44
    main(["sample", str(out), "--prompt", "Bob ", "--length", "40", "--seed", "1"])
    assert capsys.readouterr().out == first  # the seed reproduces it
    main(["sample", str(out), "--prompt", "Bob ", "--length", "40", "--temperature", "0"])
    argmax = capsys.readouterr().out
    main(
        [
            "sample",
            str(out),
            "--prompt",
            "Bob ",
            "--length",
            "40",
            "--temperature",
            "0",
            "--seed",
            "9",
        ]
    )
    assert capsys.readouterr().out == argmax  # argmax ignores the seed


def test_predict_json_and_table(trained, capsys):
    out, _ = trained
    assert main(["predict", str(out), "For his contributions, brave", "--top", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    probs = [t["prob"] for t in res["next"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert "word" in res["next_word"]
    assert main(["predict", str(out), "Bob is"]) == 0
    text = capsys.readouterr().out
    assert "after 'Bob is'" in text and "most likely next word" in text


def test_predict_sample_and_eval_with_int8_weights(trained, capsys):
    """--quantize int8 runs the model with int8-rounded weights: close to float32's answer,
    not the same numbers."""
    out, _ = trained
    prompt = "For his contributions, brave"
    results = {}
    for extra in ([], ["--quantize", "int8"]):
        assert main(["predict", str(out), prompt, "--top", "3", "--json", *extra]) == 0
        results[bool(extra)] = json.loads(capsys.readouterr().out)["next"]
    f32, i8 = results[False], results[True]
    assert [t["prob"] for t in f32] != [t["prob"] for t in i8]
    assert abs(f32[0]["prob"] - i8[0]["prob"]) < 0.05
    bpc = {}
    for extra in ([], ["--quantize", "int8"]):
        assert main(["eval", str(out), "--json", *extra]) == 0
        bpc[bool(extra)] = json.loads(capsys.readouterr().out)["bpc"]
    assert bpc[True] != bpc[False] and abs(bpc[True] - bpc[False]) < 0.1
    args = ["sample", str(out), "--length", "40", "--temperature", "0", "--quantize", "int8"]
    assert main(args) == 0
    assert len(capsys.readouterr().out) >= 40
    with pytest.raises(SystemExit):
        main(["predict", str(out), prompt, "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_eval_file_and_own_corpus(trained, corpus_file, capsys):
    out, report = trained
    assert main(["eval", str(out), "--data", str(corpus_file), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] > 0.9 * len(TEXT)
    assert res["bpc"] == pytest.approx(res["loss"] / math.log(2))
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert main(["eval", str(out), "--json"]) == 0  # the run's own validation split
    own = json.loads(capsys.readouterr().out)
    assert "validation split" in own["data"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "{tmp}/nowhere"], "no run directory at"),
        (["predict", "{tmp}", "x"], "is not a glasslstm run directory"),
        (["eval", "{tmp}/nowhere"], "no run directory at"),
    ],
)
def test_missing_or_foreign_run_directory(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_newer_or_older_format_version(trained, capsys):
    out, _ = trained
    cfg = json.loads((out / "config.json").read_text())
    for version, message in ((99, "newer glasslstm"), (0, "cannot be read")):
        (out / "config.json").write_text(json.dumps({**cfg, "format_version": version}))
        assert main(["sample", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_prompt_outside_the_vocabulary_is_read_as_unknown(trained, capsys):
    out, _ = trained
    assert main(["predict", str(out), "Zoë", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["unknown"] == 2 and len(res["next"]) == 5  # Z and ë; o is known
    assert main(["predict", str(out), "Zoë"]) == 0
    err = capsys.readouterr().err
    assert "2 characters of TEXT not in the model's vocabulary" in err


def test_eval_and_inspect_read_any_text_and_count_the_unknown(trained, tmp_path, capsys):
    out, _ = trained
    chars = set(json.loads((out / "vocab.json").read_text())["chars"])
    text = "Zoë says: ¡hola! " * 20 + TEXT[:300]
    other = tmp_path / "other.txt"
    other.write_text(text)
    unknown = sum(c not in chars for c in text)
    assert unknown >= 20
    assert main(["eval", str(out), "--data", str(other), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["unknown"] == unknown and res["tokens"] > 0 and math.isfinite(res["loss"])
    assert main(["eval", str(out), "--data", str(other)]) == 0
    assert f"unknown    {unknown:,} characters not in the vocabulary" in capsys.readouterr().out
    assert main(["inspect", str(out), "--file", str(other), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["meta"]["unknown"] == unknown
    assert f"{unknown:,} characters of {other} not in the model's vocabulary" in captured.err


def test_a_run_directory_from_before_vocab_format_2_still_loads(trained, capsys):
    """vocab.json and config.json as an earlier glasslstm wrote them: a char vocabulary
    without an unknown symbol, a train section without the split files."""
    out, _ = trained
    chars = json.loads((out / "vocab.json").read_text())["chars"] + ["~"]  # one per token
    old_vocab = {"format_version": 1, "level": "char", "vocab_size": len(chars), "chars": chars}
    (out / "vocab.json").write_text(json.dumps(old_vocab))
    cfg = json.loads((out / "config.json").read_text())
    for key in ("train", "valid", "test"):
        del cfg["train"][key]
    (out / "config.json").write_text(json.dumps(cfg))
    model = LanguageModel.load(out)
    assert model.tokenizer.chars == chars and not model.tokenizer.unk
    assert main(["eval", str(out), "--json"]) == 0  # its own validation split
    assert json.loads(capsys.readouterr().out)["unknown"] == 0
    assert main(["predict", str(out), "Bob is"]) == 0
    assert main(["sample", str(out), "--length", "20", "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["predict", str(out), "Zoë"]) == 2  # no unknown symbol: one line naming it
    err = capsys.readouterr().err
    assert "'Z'" in err and "train again" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--resume", str(out), "--max-steps", "22", "--quiet"]) == 0


WORDS = (
    " = Bob = \n \n Bob is a nice person . Dan , on the other hand , is <unk> . \n"
    " He served in the Navy for four long years . \n"
) * 30


@pytest.fixture
def split_folder(tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "wiki.train.tokens").write_text(WORDS)
    (folder / "wiki.valid.tokens").write_text(WORDS[:600])
    (folder / "wiki.test.tokens").write_text(" Dan is a brave person . \n" + WORDS[:500])
    return folder


def test_train_on_a_split_folder_scores_the_test_split(tmp_path, split_folder, capsys):
    out = tmp_path / "w"
    args = ["train", "--data", str(split_folder), "--level", "word", *SMALL]
    assert main([*args, "--max-steps", "10", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"] == {
        split: str(split_folder / f"wiki.{split}.tokens") for split in ("train", "valid", "test")
    }
    test = report["test"]
    assert {"loss", "bpc", "perplexity", "tokens"} <= set(test)
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    assert test["unknown"] == 1  # "brave" is not in the training file
    # words decoded with one space between them, whole lines ended by a newline
    sample = report["sample"]
    vocab = set(json.loads((out / "vocab.json").read_text())["tokens"])
    assert sample.split() and set(sample.split()) <= vocab and "  " not in sample
    # eval scores the run's own test split, as training did at its end
    small_eval = ["--batch-size", "4", "--seq-len", "16"]
    assert main(["eval", str(out), "--split", "test", *small_eval, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["loss"] == pytest.approx(test["loss"], rel=1e-5)
    assert res["tokens"] == test["tokens"] and "wiki.test.tokens" in res["data"]
    assert main(["eval", str(out), "--split", "test"]) == 0
    assert "per word" in capsys.readouterr().out


def test_train_on_a_file_takes_the_levels_defaults_for_what_is_not_given(tmp_path, split_folder):
    out = tmp_path / "lv"
    args = ["train", "--data", str(split_folder), "--level", "word", "--hidden", "16"]
    assert main([*args, "--max-steps", "1", "--batch-size", "2", "--out", str(out), "--json"]) == 0
    train = json.loads((out / "config.json").read_text())["train"]
    word = LEVEL_DEFAULTS["word"]
    assert word != LEVEL_DEFAULTS["char"]  # otherwise this proves nothing
    for key in ("seq_len", "dropout", "tie_weights", "lr"):
        assert train[key] == word[key], key
    assert train["hidden"] == 16 and train["batch_size"] == 2  # what was given stays


def test_train_human_report_names_the_files_and_the_test_figures(tmp_path, split_folder, capsys):
    train_file, test_file = split_folder / "wiki.train.tokens", split_folder / "wiki.test.tokens"
    args = ["train", "--train", str(train_file), "--test", str(test_file), "--level", "word"]
    assert main([*args, *SMALL, "--max-steps", "4", "--out", str(tmp_path / "h")]) == 0
    text = capsys.readouterr().out
    assert f"data: train {train_file}, test {test_file}" in text
    assert re.search(r"validation: .* perplexity [\d.]+ per word", text)
    assert re.search(
        rf"test \({test_file}, best model, [\d,]+ tokens; 1 unknown\): .*bits per "
        r"character, perplexity [\d.]+ per word",
        text,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train", "--data", "{d}"],
            r"ambiguous: 2 files for the train split \(train\.txt, "
            r"wiki\.train\.tokens\)",
        ),
        (["train", "--data", "{d}", "--train", "{d}/train.txt"], "both name the training text"),
        (["train", "--test", "{d}/valid.txt"], "--test needs --train"),
        (["train", "--max-steps", "0"], "needs --time-budget"),
        (["eval", "{run}", "--split", "test"], "has no test split"),
        (["eval", "{run}", "--split", "test", "--data", "{d}/valid.txt"], "evaluated whole"),
    ],
)
def test_split_problems_are_one_line(tmp_path, trained, capsys, args, message):
    d = tmp_path / "mixed"
    d.mkdir()
    for name in ("train.txt", "wiki.train.tokens", "valid.txt"):
        (d / name).write_text(TEXT)
    run_dir, _ = trained
    args = [a.replace("{d}", str(d)).replace("{run}", str(run_dir)) for a in args]
    out = ["--out", str(tmp_path / "r")] if args[0] == "train" else []
    assert main([*args, *out]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.search(message, errors[0]) and "Traceback" not in err


def test_train_help_says_each_levels_defaults(capsys):
    from glasslstm.config import LEVEL_DEFAULTS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in LEVEL_DEFAULTS["word"]:
        by_level = ", ".join(f"{level} {v[key]}" for level, v in LEVEL_DEFAULTS.items())
        assert f"(default: {by_level}" in text, key


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty"),
        (b"   \n\t  \n", "whitespace"),
        (b"good text " * 50 + b"\xff\xfe bad" + b" more" * 50, "byte offset 500.*--level byte"),
    ],
    ids=["empty", "whitespace", "invalid-utf8"],
)
def test_bad_corpus_files(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert main(["train", "--data", str(bad), *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    if content.startswith(b"good"):  # and byte level trains on it
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(bad),
                    *SMALL,
                    "--level",
                    "byte",
                    "--max-steps",
                    "2",
                    "--out",
                    str(tmp_path / "rb"),
                    "--quiet",
                ]
            )
            == 0
        )


def test_corpus_too_short_for_one_batch(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Bob is brave. " * 3)
    assert main(["train", "--data", str(short), *SMALL, "--out", str(tmp_path / "r")]) == 2
    assert "too few for one batch" in capsys.readouterr().err


def test_bad_option_value(tmp_path, capsys):
    assert main(["train", "--level", "morse", "--out", str(tmp_path / "r")]) == 2
    assert (
        "--level='morse' is not valid; expected one of char, word, byte" in capsys.readouterr().err
    )


def _console_script() -> str:
    script = Path(sys.executable).with_name("glasslstm")
    assert script.exists(), f"the glasslstm console script is not installed beside {sys.executable}"
    return str(script)


@pytest.mark.slow
def test_installed_console_script_end_to_end(tmp_path, corpus_file):
    out = tmp_path / "e2e"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    res = subprocess.run(
        [
            _console_script(),
            "train",
            "--data",
            str(corpus_file),
            *SMALL,
            "--max-steps",
            "10",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "bits per character" in res.stdout
    res = subprocess.run(
        [_console_script(), "sample", str(out), "--prompt", "Bob", "--length", "20", "--seed", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0 and res.stdout.startswith("Bob"), res.stderr


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(tmp_path, corpus_file):
    """A real SIGINT to the running console script: it finishes the step, saves, exits 130."""
    out = tmp_path / "ctrlc"
    proc = subprocess.Popen(
        [
            _console_script(),
            "train",
            "--data",
            str(corpus_file),
            *SMALL,
            "--max-steps",
            "100000",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    seen = b""
    # the progress lines (stderr is not a terminal): three steps done
    while max(map(int, re.findall(rb"step (\d+)/100000", seen)), default=0) < 3:
        chunk = proc.stderr.read1(4096)
        assert chunk, f"train exited early: {seen.decode(errors='replace')}"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout + stderr).decode(errors="replace")
    assert b"interrupted at step" in stdout and b"--resume" in stdout
    from glasslstm.rundir import load_train_state

    assert load_train_state(out)[1]["step"] >= 3


# ----------------------------------------------------------- the main job on the built-in stories
ARTICLE_SMALL = [
    *("--hidden", "12", "--max-steps", "6", "--curriculum", "3", "--eval-every", "6"),
    *("--eval-batches", "1", "--batch-size", "2", "--seq-len", "32", "--threads", "1"),
]


@pytest.mark.slow
def test_train_on_the_stories_reports_the_article_for_the_lstm_and_the_rnn(tmp_path, capsys):
    out = tmp_path / "article"
    assert main(["train", *ARTICLE_SMALL, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    block = report["article"]
    for name in ("lstm", "rnn"):
        r = block[name]
        assert r["n"] == 200 and r["n_pronoun"] >= 200 and 0 <= r["fill_in_accuracy"] <= 1
        assert 0 <= r["pronoun_accuracy"] <= 1 and math.isfinite(r["val_loss"])
        assert r["written"]["n"] >= 5
    assert block["min_words"] == 30 and block["lstm"]["hidden"] == 12
    assert (
        abs(block["rnn"]["parameters"] - block["lstm"]["parameters"])
        < 0.03 * block["lstm"]["parameters"]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["level"] == "word" and config["train"]["batching"] == "documents"
    rnn = json.loads((out / "rnn" / "config.json").read_text())
    assert rnn["model"]["cell"] == "rnn" and rnn["train"]["max_steps"] == 6
    assert {
        k: v for k, v in rnn["train"].items() if k not in ("cell", "hidden", "chrono_init", "out")
    } == {
        k: v
        for k, v in config["train"].items()
        if k not in ("cell", "hidden", "chrono_init", "out")
    }  # trained the same way
    for key in ("switch", "blank"):
        assert Path(block["pictures"][key]["png"]).read_bytes()[:4] == b"\x89PNG"
        assert "<html" in Path(block["pictures"][key]["html"]).read_text()

    # resumed further: the RNN is continued from its own run directory to the same step
    assert main(["train", "--resume", str(out), "--max-steps", "8", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "vanilla RNN 1x" in text and "held-out stories" in text and "switch.png" in text
    assert json.loads((out / "rnn" / "train_state.json").read_text())["step"] == 8


@pytest.mark.slow
def test_no_compare_skips_the_rnn(tmp_path, capsys):
    out = tmp_path / "alone"
    assert main(["train", *ARTICLE_SMALL, "--out", str(out), "--json", "--no-compare"]) == 0
    block = json.loads(capsys.readouterr().out)["article"]
    assert "rnn" not in block and block["lstm"]["n"] == 200 and not (out / "rnn").exists()

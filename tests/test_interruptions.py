"""Runs that stop early keep their work: stop signals save, write errors name the path and the
free space and leave the last saved state, a crash leaves no duplicate metrics rows, and a
validation split too short to use is refused before any step."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glasslstm import rundir
from glasslstm.cli import main
from glasslstm.data import Corpus
from glasslstm.errors import DataError, WriteError
from glasslstm.model import LanguageModel
from glasslstm.trainer import TrainConfig, train
from glasslstm.viz import read_metrics

TEXT = (
    "Bob is a nice person. Dan, on the other hand, is evil. Bob can swim. "
    "He served in the Navy for four long years. For his contributions, brave Bob. "
) * 12
CORPUS = Corpus(
    "tiny", TEXT.encode()[: int(len(TEXT) * 0.9)], TEXT.encode()[int(len(TEXT) * 0.9) :], "test"
)
TINY = dict(
    hidden=24, layers=2, dropout=0.1, seq_len=16, batch_size=4, eval_every=8, log_every=4, warmup=2
)
SMALL_ARGS = ["--hidden", "24", "--layers", "1", "--seq-len", "16", "--batch-size", "4"]
SMALL_ARGS += ["--eval-every", "10", "--warmup", "2", "--threads", "1"]


def run(tmp_path, name, **kw):
    cfg = TrainConfig(**{**TINY, **kw, "out": str(tmp_path / name)})
    return train(cfg, progress=False, corpus=CORPUS)


def error_line(capsys, command: str) -> str:
    lines = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        if not line.startswith(("glasslstm: resuming", "glasslstm: training"))
    ]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"glasslstm {command}: error: ")
    return lines[0]


def rows(run_dir: Path) -> list[tuple[str, int]]:
    return [(r["split"], r["step"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (LanguageModel.load(d, which="last").state_dict() for d in (a, b))
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


# ------------------------------------------------------------------------ signals


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_finish_the_step_save_and_resume(tmp_path, sig):
    """Like Ctrl-C (whose resume is bitwise exact: test_train), by the same mechanism."""

    def stop_at_11(step, loss):
        if step == 11:
            os.kill(os.getpid(), sig)  # handled between steps, like Ctrl-C

    cfg = TrainConfig(**{**TINY, "max_steps": 24, "out": str(tmp_path / "cut")})
    before = signal.getsignal(sig)
    cut = train(cfg, progress=False, corpus=CORPUS, on_step=stop_at_11)
    assert (cut.stopped, cut.step, cut.interrupted_by) == ("interrupted", 11, sig.name)
    assert f"interrupted at step 11 ({sig.name}); saved." in cut.message
    assert f"glasslstm train --resume {tmp_path / 'cut'}" in cut.message
    assert signal.getsignal(sig) is before  # the handler is gone after the run
    assert rundir.load_train_state(tmp_path / "cut")[1]["step"] == 11
    resumed = train(resume=tmp_path / "cut", progress=False, corpus=CORPUS)
    assert resumed.step == 24 and resumed.stopped == "max_steps"


def _start(out: Path, text: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "glasslstm", "train", "--data", str(text), *SMALL_ARGS]
        + ["--max-steps", "100000", "--out", str(out)],
        **popen,
    )


def _wait_for_steps(proc, stream, steps: int = 3) -> None:
    """Read the progress bar (stderr, or a pty's master fd) until it shows ``steps`` done."""
    seen = b""
    while max(map(int, re.findall(rb"(\d+)/100000", seen)), default=0) < steps:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else os.read(stream, 4096)
        assert chunk, f"train exited early: {seen.decode(errors='replace')}"
        seen += chunk


@pytest.mark.slow
def test_the_command_saves_on_sigterm_and_exits_143(tmp_path, text_file):
    """What `docker stop` or a batch scheduler sends; SIGHUP: the closed-terminal test below."""
    sig = signal.SIGTERM
    out = tmp_path / "run"
    proc = _start(out, text_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_steps(proc, proc.stderr)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (stdout + stderr).decode(errors="replace")
    said = stdout.decode()
    assert f"({sig.name}); saved. Continue with `glasslstm train --resume {out}`" in said
    step = rundir.load_train_state(out)[1]["step"]
    assert step >= 3
    assert main(["train", "--resume", str(out), "--max-steps", str(step + 2), "--quiet"]) == 0


@pytest.mark.slow
def test_a_closed_terminal_still_gets_its_save(tmp_path, text_file):
    """The run's terminal goes away (its pty master closed): SIGHUP, writes to it fail; the run
    still saves and exits 129."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # for tqdm

    def own_terminal():  # a new session whose controlling terminal is the pty (its stdin)
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    out = tmp_path / "run"
    proc = _start(out, text_file, stdin=slave, stdout=slave, stderr=slave, preexec_fn=own_terminal)
    os.close(slave)
    try:
        _wait_for_steps(proc, master)
    except BaseException:
        proc.kill()
        raise
    finally:
        os.close(master)  # hang up
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    assert rundir.load_train_state(out)[1]["step"] >= 3
    LanguageModel.load(out)


# ------------------------------------------------------------------------ write errors


def _fail_writes(monkeypatch, name: str, after: int, code: int = errno.ENOSPC) -> None:
    """Make the fsync of every write to a file called ``name`` after the first ``after`` fail
    with ``code``, as a full disk does."""
    real, count = os.fsync, [0]

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")  # a temporary .NAME.xxx.tmp, or NAME
        if f"/.{name}." in target or target.endswith(f"/{name}"):
            count[0] += 1
            if count[0] > after:
                raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_full_disk_while_saving_keeps_the_last_saved_state(tmp_path, monkeypatch):
    run(tmp_path, "full", max_steps=24)
    _fail_writes(monkeypatch, "train_state.safetensors", after=2)  # steps 0 and 8 saved
    cut = tmp_path / "cut"
    with pytest.raises(WriteError) as caught:
        run(tmp_path, "cut", max_steps=24)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"cannot write {cut / 'train_state.safetensors'}: No space left on device (ENOSPC); "
    )
    assert " free there; the last saved state (step 8) in " in message
    assert f"free some space, then continue with `glasslstm train --resume {cut}`" in message
    assert not list(cut.glob(".*.tmp"))  # no half-written file left behind
    assert rundir.load_train_state(cut)[1]["step"] == 8
    monkeypatch.undo()
    assert train(resume=cut, progress=False, corpus=CORPUS).step == 24
    assert same_weights(tmp_path / "full", cut) and rows(cut) == rows(tmp_path / "full")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_real_full_disk_is_one_line_and_exit_1(tmp_path, text_file, capsys):
    """/dev/full answers every write with ENOSPC: metrics.jsonl pointed at it."""
    out = tmp_path / "run"
    argv = ["train", "--data", str(text_file), *SMALL_ARGS, "--out", str(out), "--quiet"]
    assert main([*argv, "--max-steps", "10"]) == 0
    capsys.readouterr()
    metrics = out / "metrics.jsonl"
    kept = metrics.read_bytes()
    metrics.unlink()
    metrics.symlink_to("/dev/full")
    assert main(["train", "--resume", str(out), "--max-steps", "20", "--quiet"]) == 1
    line = error_line(capsys, "train")
    assert f"cannot write {metrics}: No space left on device (ENOSPC);" in line
    assert f"the last saved state (step 10) in {out} is intact" in line
    metrics.unlink()
    metrics.write_bytes(kept)
    assert main(["train", "--resume", str(out), "--max-steps", "20", "--quiet"]) == 0
    assert rows(out) == [("train", 10), ("val", 10), ("train", 20), ("val", 20)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_failed_report_write_keeps_the_old_report(tiny_run, tmp_path, capsys, monkeypatch):
    report = tmp_path / "report.html"
    report.write_text("the previous report")
    _fail_writes(monkeypatch, "report.html", after=0, code=errno.EACCES)
    assert main(["inspect", str(tiny_run), "--text", "Bob", "--html", str(report)]) == 1
    line = error_line(capsys, "inspect")
    assert f"cannot write {report}: Permission denied (EACCES); " in line and "free there" in line
    assert report.read_text() == "the previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_an_unwritable_run_folder_is_one_line(tmp_path, monkeypatch):
    def refuse(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(WriteError, match=r"cannot write .*run: Permission denied .*train again"):
        run(tmp_path, "run", max_steps=2)


# ------------------------------------------------------------------------ metrics after a crash


class Crash(Exception):
    """What kill -9 leaves: the process gone between two writes, nothing cleaned up."""


@pytest.mark.slow
def test_metrics_continue_from_the_checkpoint_without_duplicates(tmp_path):
    full = run(tmp_path, "full", max_steps=24)

    def crash_at_13(step, loss):
        if step == 13:
            raise Crash  # rows for steps 4-12 written, checkpoint at 8

    with pytest.raises(Crash):
        train(
            TrainConfig(**{**TINY, "max_steps": 24, "out": str(tmp_path / "cut")}),
            progress=False,
            corpus=CORPUS,
            on_step=crash_at_13,
        )
    assert rows(tmp_path / "cut")[-1] == ("train", 12)
    train(resume=tmp_path / "cut", progress=False, corpus=CORPUS)
    assert rows(tmp_path / "cut") == rows(full.run_dir)  # each row once, in order
    losses = [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert losses == [r["loss"] for r in read_metrics(full.run_dir / "metrics.jsonl")]


def test_trim_metrics_keeps_rows_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"split": "train", "step": s} for s in (10, 20, 30)] + [{"split": "val", "step": 20}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"split": "tr')
    assert rundir.trim_metrics(path, 20) == 2  # step 30 and the line cut short
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [10, 20, 20]
    assert rundir.trim_metrics(path, 20) == 0
    assert rundir.trim_metrics(tmp_path / "missing.jsonl", 5) == 0


def test_metrics_lines_that_are_not_rows_are_skipped(tmp_path):
    from glasslstm.viz import plot_curves

    path = tmp_path / "metrics.jsonl"
    good = [{"split": "train", "step": s, "bpc": 3.0 - s / 10} for s in (10, 20)]
    junk = ["[1, 2]", "[" * 5000 + "]" * 5000, '{"split": "val", "step": 5, "bpc": "x"}', "{"]
    path.write_text("\n".join([json.dumps(good[0]), *junk, json.dumps(good[1])]) + "\n")
    assert read_metrics(path)[0] == good[0] and read_metrics(path)[-1] == good[1]
    assert plot_curves(path, tmp_path / "curves.png") == tmp_path / "curves.png"


@pytest.mark.slow
def test_kill_9_then_resume_leaves_each_row_once(tmp_path, text_file):
    out = tmp_path / "run"
    proc = _start(out, text_file, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_steps(proc, proc.stderr, steps=15)
    proc.kill()
    proc.communicate(timeout=60)
    step = rundir.load_train_state(out)[1]["step"]
    assert main(["train", "--resume", str(out), "--max-steps", str(step + 20), "--quiet"]) == 0
    got = rows(out)
    assert len(got) == len(set(got))
    assert [s for split, s in got if split == "train"] == list(range(10, step + 21, 10))


# ------------------------------------------------------------------------ the validation split


def test_a_validation_split_under_two_tokens_is_refused_before_any_step(tmp_path):
    steps = []
    tiny_val = Corpus("short", CORPUS.train, b"B", "test")
    cfg = TrainConfig(**{**TINY, "out": str(tmp_path / "r")})
    with pytest.raises(DataError, match=r"validation split of 'short' has 1 token\(s\); valid"):
        train(cfg, progress=False, corpus=tiny_val, on_step=lambda s, loss: steps.append(s))
    assert steps == [] and not (tmp_path / "r").exists()


def test_a_validation_split_under_two_tokens_from_the_command_line(tmp_path, capsys):
    text = tmp_path / "one-word-tail.txt"
    text.write_text("ab " * 40 + "\n" + " " * 20)  # the last tenth: blanks, one <eos>
    out = tmp_path / "r"
    argv = ["train", "--data", str(text), "--level", "word", "--min-freq", "1"]
    assert main([*argv, "--batch-size", "1", "--seq-len", "4", "--out", str(out)]) == 2
    assert "has 1 token(s); validation needs at least 2" in error_line(capsys, "train")
    assert not out.exists()

"""Data-parallel training: N processes (torchrun, gloo on 127.0.0.1) train the same model as one
process with the same global batch; each rank has its own rows; rank 0 alone writes; a run
resumes only with the world size it was trained with; a stop signal saves once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glasslstm import distributed, rundir
from glasslstm.cli import main
from glasslstm.data import TokenStream
from glasslstm.distributed import Ranks, RowShard
from glasslstm.errors import ConfigError
from glasslstm.model import LanguageModel
from glasslstm.trainer import train
from glasslstm.viz import read_metrics

TEXT = (
    "Bob is a nice person. Dan, on the other hand, is evil. Bob can swim. "
    "He served in the Navy for four long years. For his contributions, brave Bob. "
) * 12
# No dropout: with it each rank draws its own masks, so only the dropout-free run is equal.
ARGS = ["--hidden", "24", "--layers", "2", "--dropout", "0", "--seq-len", "16"]
ARGS += ["--batch-size", "4", "--schedule", "constant", "--warmup", "2", "--lr", "1e-2"]
ARGS += ["--eval-every", "4", "--log-every", "1", "--threads", "1", "--quiet"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    # One thread a process; no torchrun variables inherited from an outer launcher.
    keep = {k: v for k, v in os.environ.items() if k not in distributed.ENV_KEYS}
    return {**keep, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m glasslstm train ARGS`` on 127.0.0.1."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    command += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    command += ["-m", "glasslstm", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env(), timeout=600)


def losses(run_dir: Path, split: str) -> list[tuple[int, float]]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [(r["step"], r["loss"]) for r in rows if r["split"] == split]


def assert_same_run(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        la, lb = losses(a, split), losses(b, split)
        assert [s for s, _ in la] == [s for s, _ in lb]  # each step once: one writer
        assert [x for _, x in la] == pytest.approx([x for _, x in lb], rel=1e-5)
    for which in ("last", "best"):
        wa, wb = (LanguageModel.load(d, which=which).state_dict() for d in (a, b))
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------ in one process


def test_the_ranks_rows_make_up_the_global_batch():
    ids = torch.arange(1000)
    stream = TokenStream(ids, 6, 8)
    shards = [RowShard(stream, Ranks(r, 3)) for r in range(3)]
    for k in (0, 5, stream.num_batches - 1):
        x, y = stream.batch(k)
        parts = [s.batch(k) for s in shards]
        assert all(p[0].shape == (2, 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    # Each rank reads a contiguous stretch of the stream, disjoint from the others'.
    seen = [torch.cat([s.batch(k)[0].flatten() for k in range(stream.num_batches)]) for s in shards]
    spans = [(int(v.min()), int(v.max())) for v in seen]
    assert spans[0][1] < spans[1][0] and spans[1][1] < spans[2][0]
    x, _ = stream.random_batch(7)
    assert torch.equal(torch.cat([s.random_batch(7)[0] for s in shards]), x)


def test_validation_rows_are_shared_out_once():
    grid = torch.arange(35).view(7, 5)
    parts = [Ranks(r, 3).eval_rows(grid) for r in range(3)]
    assert sorted(torch.cat(parts)[:, 0].tolist()) == grid[:, 0].tolist()


def test_the_global_batch_must_split_evenly():
    distributed.check_batch(6, 2)
    distributed.check_batch(5, 1)
    with pytest.raises(ConfigError, match=r"--batch-size 5 is the global batch .* 2 processes"):
        distributed.check_batch(5, 2)


def test_nproc_refuses_what_cannot_work_before_starting(tiny_run, tmp_path, capsys):
    assert main(["train", "--batch-size", "5", "--nproc", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "glasslstm train: error: --batch-size 5 is the global batch and must split evenly "
        "among the 2 processes: use a multiple of 2"
    ]
    assert not (tmp_path / "r").exists()
    assert main(["train", "--resume", str(tiny_run), "--nproc", "2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{tiny_run} was trained with 1 process and cannot resume with 2 processes" in line
    assert f"`glasslstm train --resume {tiny_run}`" in line


def test_torchrun_variables_without_a_rendezvous_are_named(tmp_path, monkeypatch):
    for key in distributed.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        train(resume=None, overrides={"out": str(tmp_path / "r")}, progress=False)


# ------------------------------------------------------------------------ several processes


@pytest.mark.slow
def test_two_processes_train_what_one_does_and_resume_only_as_two(tmp_path, text_file):
    data = ["--data", str(text_file), *ARGS]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *data, "--max-steps", "8", "--out", str(one)]) == 0

    # 4 steps with torchrun itself, then 4 more resumed through --nproc (the agent in-process)
    done = torchrun(*data, "--max-steps", "4", "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stopped: max_steps at step 4") == 1  # rank 0 reports, alone
    header, meta = rundir.read_train_state_header(two)
    assert meta["world_size"] == 2 and meta["step"] == 4
    assert header["carry.h"][0] == (2, 4, 24)  # both ranks' rows: the global batch's state
    assert header[distributed.RNG_CPU_KEY][0][0] == 2  # each rank's random stream
    assert main(["train", "--resume", str(two), "--max-steps", "8", "--nproc", "2"]) == 0
    assert_same_run(one, two)

    with pytest.raises(ConfigError) as refused:  # one process may not continue it
        train(resume=two, overrides={"max_steps": 10}, progress=False)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{two} was trained with 2 processes and cannot resume with 1 process" in message
    assert f"--resume {two} --nproc 2" in message
    assert rundir.read_train_state_header(two)[1]["step"] == 8  # nothing written


@pytest.mark.slow
def test_a_stop_signal_stops_every_rank_after_the_same_step_and_saves_once(tmp_path, text_file):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "glasslstm", "train", "--data", str(text_file), *ARGS]
    command += ["--max-steps", "100000", "--eval-every", "100000", "--nproc", "2"]
    proc = subprocess.Popen(
        command + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env()
    )
    deadline = time.monotonic() + 300
    while not any(r["split"] == "train" for r in _rows(out)):
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the launcher; its agent passes it on
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=300))
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    step = rundir.read_train_state_header(out)[1]["step"]
    assert step >= 1
    assert stdout.count(f"interrupted at step {step} (SIGINT); saved.") == 1, stdout
    steps = [r["step"] for r in _rows(out) if r["split"] == "train"]
    assert steps == list(range(1, step + 1))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["step"] == str(step)  # the weights of the same step
    assert main(["train", "--resume", str(out), "--max-steps", str(step + 2), "--nproc", "2"]) == 0
    assert rundir.read_train_state_header(out)[1]["step"] == step + 2


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def _save_and_restore(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: gather the resume point's share, draw, restore, draw again."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ranks = Ranks(rank, 2)
        torch.manual_seed(100 + rank)  # each rank its own stream, as after Ranks.seed
        state = (torch.full((2, 3, 4), float(rank)), torch.full((2, 3, 5), 10.0 + rank))
        torch.rand(7)  # the stream moves on before the save
        full, tensors, meta = ranks.for_save(state)
        after_save = torch.rand(5)  # what the run draws next
        torch.rand(11)  # ...and more, before it is stopped
        torch.manual_seed(0)  # a resumed process starts from rank 0's generators (rng.*)
        mine = ranks.restore(tensors, full)
        result = {
            "same": torch.equal(torch.rand(5), after_save),
            "meta": meta,
            "full": [list(t.shape) for t in full],
            "rows_after_mine": full[0][:, 3:].tolist(),
            "mine": [t.tolist() for t in mine],
        }
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_rank_gets_back_its_own_generator_and_rows(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_save_and_restore, args=(free_port(), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for rank, g in enumerate(got):
        assert g["same"]  # the draws after the restore are the ones after the save
        assert g["meta"] == {"world_size": 2}
        assert g["full"] == [[2, 6, 4], [2, 6, 5]]  # both ranks' rows: the global batch
        assert g["mine"][0] == torch.full((2, 3, 4), float(rank)).tolist()
        assert g["mine"][1] == torch.full((2, 3, 5), 10.0 + rank).tolist()
        assert g["rows_after_mine"] == torch.ones(2, 3, 4).tolist()  # rank 1's rows follow 0's


# A process that ends through distributed.finish: it writes a file from an exit handler and
# one from a finalizer that only the interpreter's teardown runs, and leaves words unflushed.
ENDING = """
import atexit, os, sys
from pathlib import Path
import torch
from glasslstm import distributed

out = Path(sys.argv[1]) / os.environ.get("RANK", "alone")
out.mkdir()
if os.environ.get("WORLD_SIZE"):
    with distributed.session("cpu", 2) as ranks:
        assert ranks.mean(torch.tensor(float(ranks.rank))) == 0.5
atexit.register(lambda: (out / "exit_handler").write_text("ran"))


class Teardown:
    def __del__(self):
        (out / "teardown").write_text("ran")


kept = Teardown()
sys.stdout.write("last words")  # a pipe: buffered until flushed
distributed.finish(int(sys.argv[2]))
"""


@pytest.mark.slow
def test_a_process_that_left_a_group_ends_without_teardown_and_loses_no_output(tmp_path):
    # gloo's worker threads outlive the group, and one that frees the last collective's
    # tensors while the interpreter is torn down aborts the process after a finished run.
    script = tmp_path / "ending.py"
    script.write_text(ENDING)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    command += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    done = subprocess.run(
        [*command, str(script), str(tmp_path), "0"], capture_output=True, text=True, env=env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("last words") == 2
    for rank in ("0", "1"):
        assert (tmp_path / rank / "exit_handler").read_text() == "ran"
        assert not (tmp_path / rank / "teardown").exists()  # no teardown, nothing to abort in

    # A process that joined no group exits as usual: with its status, torn down.
    alone = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "3"], capture_output=True, text=True, env=env()
    )
    assert alone.returncode == 3, alone.stderr[-3000:]
    assert alone.stdout == "last words"
    assert (tmp_path / "alone" / "exit_handler").read_text() == "ran"
    assert (tmp_path / "alone" / "teardown").read_text() == "ran"

"""Deterministic mode: bitwise identical training, in one process and across fresh ones."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import glasslstm
from glasslstm import determinism
from glasslstm.data import Corpus
from glasslstm.model import LanguageModel
from glasslstm.trainer import TrainConfig, train

TEXT = "Bob is a nice person. Dan, on the other hand, is evil. Bob can swim. " * 30
TINY = [
    "--hidden",
    "24",
    "--layers",
    "2",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--max-steps",
    "12",
    "--eval-every",
    "6",
    "--warmup",
    "2",
    "--dropout",
    "0.1",
]


@pytest.fixture(autouse=True)
def _restore_torch_flags():
    """Whatever a test switches on, the next test starts from the same global state."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.get_num_threads(),
    )
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:3]
    if torch.get_num_threads() != saved[3]:
        torch.set_num_threads(saved[3])


@pytest.mark.slow
def test_two_fresh_processes_train_bitwise_identical_weights(tmp_path):
    """`glasslstm train --deterministic` run twice, as a user would, under two hash seeds."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    procs = []
    for k, hash_seed in enumerate(("1", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "glasslstm",
            "train",
            "--data",
            str(data),
            *TINY,
            "--deterministic",
            "--threads",
            "1",
            "--json",
            "--out",
            str(tmp_path / f"run{k}"),
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    for name in ("model.safetensors", "best/model.safetensors"):
        a, b = ((tmp_path / f"run{k}" / name).read_bytes() for k in (0, 1))
        assert len(a) > 10_000 and a == b, name
    cfg = glasslstm.rundir.read_config(tmp_path / "run0")
    assert cfg["train"]["deterministic"] is True


def test_same_process_trains_bitwise_identical_weights_and_restores_flags(tmp_path):
    corpus = Corpus("tiny", TEXT.encode()[:1800], TEXT.encode()[1800:], "test")
    weights = []
    for k in range(2):
        cfg = TrainConfig(
            hidden=24,
            layers=2,
            seq_len=16,
            batch_size=4,
            max_steps=10,
            eval_every=5,
            warmup=2,
            deterministic=True,
            out=str(tmp_path / f"r{k}"),
        )
        train(cfg, progress=False, corpus=corpus)
        weights.append(LanguageModel.load(tmp_path / f"r{k}", which="last").state_dict())
        assert not determinism.is_deterministic()  # train() puts the flags back
    a, b = weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_set_deterministic_switches_torch_flags(monkeypatch):
    monkeypatch.delenv(determinism.CUBLAS_ENV, raising=False)
    glasslstm.set_deterministic(True, threads=1)
    assert determinism.is_deterministic() and torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ[determinism.CUBLAS_ENV] == ":4096:8"
    status = determinism.status()
    assert status["threads"] == torch.get_num_threads() == 1
    assert status["deterministic_algorithms"] and status["cublas_workspace_config"] == ":4096:8"
    glasslstm.set_deterministic(False)
    assert not determinism.is_deterministic() and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match="threads"):
        glasslstm.set_deterministic(True, threads=0)


def test_context_manager_restores_everything(monkeypatch):
    monkeypatch.setenv(determinism.CUBLAS_ENV, ":16:8")  # the user's own setting survives
    threads = torch.get_num_threads()
    with glasslstm.deterministic(threads=threads + 1):
        assert determinism.is_deterministic() and torch.get_num_threads() == threads + 1
        assert os.environ[determinism.CUBLAS_ENV] == ":16:8"
    assert not determinism.is_deterministic() and torch.get_num_threads() == threads
    monkeypatch.delenv(determinism.CUBLAS_ENV)
    with glasslstm.deterministic():
        assert os.environ[determinism.CUBLAS_ENV] == ":4096:8"
    assert determinism.CUBLAS_ENV not in os.environ
    with glasslstm.deterministic(False):  # off: changes nothing
        assert not determinism.is_deterministic()
    with pytest.raises(RuntimeError, match="boom"), glasslstm.deterministic():
        raise RuntimeError("boom")
    assert not determinism.is_deterministic()


@pytest.mark.gpu
def test_cuda_training_is_bitwise_repeatable(tmp_path):
    """Deterministic mode on the GPU: no op refuses to run, and two runs give the same bits."""
    corpus = Corpus("tiny", TEXT.encode()[:1800], TEXT.encode()[1800:], "test")
    weights = []
    for k in range(2):
        cfg = TrainConfig(
            hidden=32,
            layers=2,
            seq_len=16,
            batch_size=8,
            max_steps=8,
            eval_every=4,
            warmup=2,
            deterministic=True,
            device="cuda",
            out=str(tmp_path / f"r{k}"),
        )
        train(cfg, progress=False, corpus=corpus)
        weights.append(LanguageModel.load(tmp_path / f"r{k}", which="last").state_dict())
    a, b = weights
    assert all(torch.equal(a[k], b[k]) for k in a)

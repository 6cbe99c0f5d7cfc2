"""The long-term-memory benchmark in quick mode, and the gradient measurement."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from glasslstm.bench.memory import SequenceModel, gradient_norms, train_memory
from glasslstm.cli import main
from glasslstm.tasks import make_task


@pytest.mark.slow
def test_quick_mode_lstm_beats_the_adding_baseline_by_a_clear_margin():
    """T = 20, 400 steps: the LSTM gets the adding problem's MSE far below predicting the mean."""
    task = make_task("adding", 20)
    run = train_memory(
        task,
        "lstm",
        budget=12_800,
        batch_size=32,
        hidden_size=32,
        lr=1e-2,
        evals=4,
        eval_size=256,
        seed=0,
    )
    assert run.metric["mse"] < 0.2 * task.baseline, run.metric
    assert run.curve[0][1] > 0.5 * task.baseline  # it started near the baseline
    # training flushed denormals (the RNN's vanishing gradient would crawl through them);
    # afterwards they are back: 1e-30 * 1e-10 is a denormal float32, not zero
    assert (torch.tensor([1e-30]) * 1e-10).item() != 0.0


def test_gradient_vanishes_for_the_rnn_not_along_the_lstm_cell():
    """At initialisation, 50 steps back: the RNN's dL/dh_t is orders of magnitude smaller."""
    task = make_task("adding", 50)
    torch.manual_seed(0)
    rnn = gradient_norms(SequenceModel("rnn", task, 32), task)
    torch.manual_seed(0)
    lstm = gradient_norms(SequenceModel("lstm", task, 32), task)
    assert len(rnn["h"]) == len(lstm["h"]) == len(lstm["c"]) == 50
    assert "c" not in rnn
    assert rnn["h"][0] > 0 and lstm["h"][0] > 0
    assert rnn["h"][49] / rnn["h"][0] < 1e-6
    # the LSTM's gradient decays too at init (forget gates ~0.7), but far more slowly
    assert lstm["h"][49] > 1e3 * rnn["h"][49]
    assert lstm["c"][49] > 1e3 * rnn["h"][49]


@pytest.mark.slow
def test_bench_memory_command_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "mem"
    assert (
        main(
            [
                "bench",
                "memory",
                "--task",
                "copy",
                "--T",
                "5,10",
                "--models",
                "lstm,rnn",
                "--budget",
                "256",
                "--hidden",
                "16",
                "--init",
                "chrono",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "copy" in table and "lstm" in table and "rnn" in table and "baseline" in table
    data = json.loads((out / "memory-copy.json").read_text())
    assert [(r["T"], r["model"]) for r in data["runs"]] == [
        (5, "lstm"),
        (5, "rnn"),
        (10, "lstm"),
        (10, "rnn"),
    ]
    assert data["init"] == "chrono" and {r["init"] for r in data["runs"]} == {"chrono"}
    assert data["runs"][0]["baseline"] == pytest.approx(
        10 * torch.log(torch.tensor(8.0)).item() / 25
    )
    assert (out / "memory-copy.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "memory-copy-curves.png").read_bytes()[:4] == b"\x89PNG"  # learning curves


def test_chrono_init_spans_the_task_length_for_the_lstm_only():
    task = make_task("copy", 30)  # 50 steps: 10 symbols, 30, 10
    lstm = SequenceModel("lstm", task, 16, init="chrono").rnn
    assert lstm.chrono_init == task.seq_len == 50 and lstm.forget_bias == 0.0
    b_f = lstm.bias_ih_l0.detach()[16:32]
    assert float(b_f.min()) >= 0.0 and float(b_f.max()) <= torch.log(torch.tensor(49.0)).item()
    assert SequenceModel("lstm", task, 16).rnn.forget_bias == 1.0  # the default: forget1
    torch.manual_seed(0)
    gru_plain = SequenceModel("gru", task, 16)
    torch.manual_seed(0)
    gru_chrono = SequenceModel("gru", task, 16, init="chrono")  # torch's init, unchanged
    assert all(torch.equal(a, b) for a, b in zip(gru_plain.parameters(), gru_chrono.parameters()))
    with pytest.raises(ValueError, match="unknown init"):
        SequenceModel("lstm", task, 16, init="orthogonal")


def test_bench_gradient_command(tmp_path, capsys):
    out = tmp_path / "grad"
    assert (
        main(
            [
                "bench",
                "gradient",
                "--T",
                "20",
                "--budget",
                "64",
                "--hidden",
                "8",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert set(res["models"]) == {"lstm", "gru", "rnn"}
    assert len(res["models"]["lstm"]["trained"]["c"]) == 20
    assert (out / "gradient-adding.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "lstm,transformer"], "--models must name some of"),
        (["--T", "ten"], "--T must be comma-separated integers"),
        (["--task", "subject", "--T", "3"], "T must be"),
    ],
)
def test_bench_memory_bad_options(tmp_path, capsys, args, message):
    assert main(["bench", "memory", "--budget", "32", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_speed_quick_reports_every_section(tmp_path, capsys):
    assert main(["bench", "speed", "--quick", "--json", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((tmp_path / "speed.json").read_text())
    train = res["train"]["16"]
    jax = {"JAX lax.scan (jit)"} if importlib.util.find_spec("jax") else set()  # optional peer
    assert set(train) == {"torch.nn.LSTM", "glasslstm", "glasslstm+gates"} | jax
    assert all(r["ms"] > 0 and r["gflops"] > 0 and r["speedup"] > 0 for r in train.values())
    assert train["torch.nn.LSTM"]["speedup"] == 1.0  # the peer against itself
    bf16 = res["train_bf16"]["16"]  # under bf16 autocast
    assert set(bf16) == {"torch.nn.LSTM", "glasslstm", "glasslstm+gates"}
    assert all(r["ms"] > 0 and r["speedup"] > 0 and "gflops" not in r for r in bf16.values())
    assert set(res["infer"]["16"]) == {"torch.nn.LSTM", "glasslstm"} | jax
    step = res["step"]["16"]
    assert step["glasslstm Stream"]["us"] > 0 and step["torch.nn.LSTM"]["speedup"] == 1.0
    gen = res["generate"]
    assert gen["glasslstm"]["tokens_per_s"] > 0 and gen["torch.nn.LSTM"]["tokens_per_s"] > 0
    peak = res["gemm_peak"]
    assert peak["gflops"] == max(peak["rates"].values()) > 0 and peak["by"] in peak["rates"]
    assert {"torch.mm", "glasslstm oneDNN kernel"} <= set(peak["rates"])
    # the fraction of peak divides by the best implementation measured
    assert all(r["of_peak"] == pytest.approx(r["gflops"] / peak["gflops"]) for r in train.values())
    assert res["backend"].startswith("auto") and res["machine"]["cpu"]
    assert "step products by" in res["gemm"]["16"]


@pytest.mark.slow
def test_bench_speed_table_and_bad_options(tmp_path, capsys):
    assert main(["bench", "speed", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| step (batch 1) | 16 | glasslstm Stream |" in out and "tokens/s" in out
    assert "| train, bf16 autocast | 16 | glasslstm |" in out
    assert "CPU: " in out and "H=16: CPU: " in out and "step products by " in out
    assert main(["bench", "speed", "--sizes", "0", "--out", str(tmp_path)]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_bench_gemm_measures_and_prints_the_choice(tmp_path, monkeypatch, capsys):
    from glasslstm.ops import gemm

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(gemm, "probe", lambda c, *a, **k: 1.0 if c == "onednn" else 2.0)
    monkeypatch.setattr(gemm, "probe_loop", lambda c, *a, **k: 1.0 if c == "torch" else 3.0)
    monkeypatch.setattr(gemm, "busy", lambda: False)
    try:
        assert main(["bench", "gemm", "--sizes", "16,32", "--batch-size", "8"]) == 0
    finally:
        gemm.forget()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("CPU: ")
    big = [line for line in lines if line.startswith("big ")]
    loop = [line for line in lines if line.startswith("loop B=8 ")]
    assert big and all(": onednn (onednn 1000000.0 us" in line for line in big)
    assert loop and all(": torch (" in line and "torch 1000000.0 us" in line for line in loop)
    assert (tmp_path / "glasslstm" / "gemm.json").is_file()

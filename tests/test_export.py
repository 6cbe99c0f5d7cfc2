"""ONNX export (glasslstm.export, `glasslstm export`) checked against onnxruntime, and the
generation example (glasslstm/onnx_generate.py) run with onnxruntime and NumPy alone."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import glasslstm
from glasslstm import onnx_generate
from glasslstm.cli import main
from glasslstm.errors import ConfigError
from glasslstm.export import compare, describe, session, to_onnx


def _initializers(path) -> set[str]:
    return {t.name for t in onnx.load(str(path)).graph.initializer}


# ---- what cannot be exported, and a missing dependency: one clear line ---------------------------


def test_only_glasslstm_models_in_float32_or_float64(tmp_path):
    with pytest.raises(ConfigError, match="glasslstm.LSTM or a glasslstm.LanguageModel"):
        to_onnx(torch.nn.LSTM(4, 8), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match=r"bfloat16.*\.float\(\)"):
        to_onnx(glasslstm.LSTM(4, 8, dtype=torch.bfloat16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_without_the_export_extra_the_error_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` fails
    with pytest.raises(ConfigError, match=r"needs onnxscript.*pip install glasslstm\[export\]$"):
        to_onnx(glasslstm.LSTM(4, 8), tmp_path / "m.onnx")
    model = glasslstm.LanguageModel(glasslstm.ModelConfig(vocab_size=5, hidden_size=8))
    model.save(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install glasslstm[export]" in err
    assert not (tmp_path / "m.onnx").exists()


# ---- a bare LSTM ---------------------------------------------------------------------------------

LSTMS = {
    # ONNX's LSTM operator: one node per layer (and direction), biases, a forget bias
    "layers": (lambda: glasslstm.LSTM(5, 12, 2, forget_bias=1.0), {"LSTM": 2}),
    "bidirectional": (lambda: glasslstm.LSTM(5, 12, 1, bidirectional=True), {"LSTM": 2}),
    # plain operators (a Scan per layer and direction): projection, no bias, batch-first
    "projection": (
        lambda: glasslstm.LSTM(
            5, 12, 2, bias=False, batch_first=True, proj_size=4, bidirectional=True
        ),
        {"Scan": 4},
    ),
    # plain operators too: onnxruntime's LSTM kernel takes float32 only
    "float64": (lambda: glasslstm.LSTM(5, 12, 2, dtype=torch.float64), {"Scan": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LSTMS))
def test_lstm_matches_onnxruntime_with_state_in_and_out(name, tmp_path):
    make, layers = LSTMS[name]
    lstm = make().eval()
    dtype = lstm.weight_ih_l0.dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    path = to_onnx(lstm, tmp_path / "lstm.onnx")
    info = describe(path)
    for op in ("LSTM", "Scan"):
        assert info["operators"].get(op, 0) == layers.get(op, 0)
    LD, P = lstm.num_layers * lstm.num_directions, lstm.proj_size or lstm.hidden_size
    batch_time = ("batch", "time") if lstm.batch_first else ("time", "batch")
    assert info["inputs"] == {
        "input": [*batch_time, 5],
        "h0": [LD, "batch", P],
        "c0": [LD, "batch", 12],
    }
    assert list(info["outputs"]) == ["output", "h_n", "c_n"]
    if "LSTM" in layers:  # W, R and B are stored in ONNX's gate order, not permuted per run
        graph = onnx.load(str(path)).graph
        stored = _initializers(path)
        for node in (n for n in graph.node if n.op_type == "LSTM"):
            assert all(name in stored for name in node.input[1:4])

    sess = session(path)
    for B, T in ((1, 1), (3, 9), (2, 20)):  # one file, several batch and sequence sizes
        shape = (B, T, 5) if lstm.batch_first else (T, B, 5)
        x = torch.randn(*shape, dtype=dtype)
        h0, c0 = torch.randn(LD, B, P, dtype=dtype), torch.randn(LD, B, 12, dtype=dtype)
        with torch.no_grad():
            y, (h_n, c_n) = lstm(x, (h0, c0))
        got = sess.run(None, {"input": x.numpy(), "h0": h0.numpy(), "c0": c0.numpy()})
        for want, have in zip((y, h_n, c_n), got):
            assert have.dtype == want.numpy().dtype
            np.testing.assert_allclose(have, want.numpy(), rtol=0, atol=tol)
        if T > 1 and not lstm.bidirectional:  # the state carried: two calls are one
            cut = T // 3
            first = x[:, :cut] if lstm.batch_first else x[:cut]
            rest = x[:, cut:] if lstm.batch_first else x[cut:]
            y1, h1, c1 = sess.run(
                None, {"input": first.numpy(), "h0": h0.numpy(), "c0": c0.numpy()}
            )
            y2, h2, c2 = sess.run(None, {"input": rest.numpy(), "h0": h1, "c0": c1})
            both = np.concatenate([y1, y2], axis=1 if lstm.batch_first else 0)
            np.testing.assert_allclose(both, y.numpy(), rtol=0, atol=tol)
            np.testing.assert_allclose(h2, h_n.numpy(), rtol=0, atol=tol)
            np.testing.assert_allclose(c2, c_n.numpy(), rtol=0, atol=tol)
    assert compare(lstm, path) <= tol


@pytest.mark.slow
def test_export_leaves_the_model_as_it_was(tmp_path):
    lstm = glasslstm.LSTM(4, 8, backend="bptt")  # training mode, another backend
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    to_onnx(lstm, tmp_path / "m.onnx")
    assert lstm.training and lstm.backend == "bptt"
    assert all(torch.equal(before[k], v) for k, v in lstm.state_dict().items())


# ---- a language model, from the command line, and generation with onnxruntime alone --------------


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "glasslstm", "export", str(tiny_run), "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out, json.loads(proc.stdout)


@pytest.mark.slow
def test_cli_exports_a_run_checked_against_onnxruntime(exported, tiny_run):
    path, report = exported
    assert report["path"] == str(path) and path.stat().st_size == report["bytes"]
    assert report["operators"]["LSTM"] == 2 and "Scan" not in report["operators"]
    assert report["inputs"]["tokens"] == ["batch", "time"]
    assert report["outputs"]["logits"][:2] == ["batch", "time"]
    assert 0 <= report["max_abs_difference"] <= 1e-5
    meta = describe(path)["metadata"]
    model = glasslstm.LanguageModel.load(tiny_run)
    assert json.loads(meta["glasslstm.vocab"]) == model.tokenizer.to_dict()
    assert json.loads(meta["glasslstm.model"]) == model.config_dict()


def _run_without_torch(*args: str) -> subprocess.CompletedProcess:
    """glasslstm/onnx_generate.py as a script, in a Python where importing torch fails."""
    script = Path(onnx_generate.__file__)
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = ['onnx_generate.py', *{list(args)!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.slow
def test_onnxruntime_alone_generates_what_glasslstm_generates(exported, tiny_run):
    path, _ = exported
    model = glasslstm.LanguageModel.load(tiny_run)
    prompt = "For his contributions, brave"
    want = prompt + "".join(model.generate(prompt, 60, temperature=0))  # the argmax, each step
    proc = _run_without_torch(str(path), "--prompt", prompt, "--length", "60", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want + "\n"
    # sampled, one token at a time: reproducible with a seed, drawn from the model's tokens
    args = (str(path), "--length", "40", "--temperature", "0.8", "--top-k", "5", "--seed", "3")
    a, b = _run_without_torch(*args), _run_without_torch(*args)
    assert a.returncode == 0 and a.stdout == b.stdout
    assert set(a.stdout) <= set(model.tokenizer.chars) | {"\n"}


@pytest.mark.slow
def test_onnx_generation_state_matches_glasslstm_stream(exported, tiny_run):
    path, _ = exported
    model = glasslstm.LanguageModel.load(tiny_run)
    lm = onnx_generate.OnnxLanguageModel(path)
    ids = model.tokenizer.encode("Bob can swim. He served")
    stream = model.stream()
    state = lm.initial_state()
    for i in ids:  # one token per call, the state fed back
        want = stream.step(i).numpy()
        logits, state = lm.run([[i]], state)
        np.testing.assert_allclose(logits[0, 0], want, rtol=0, atol=1e-5)
    h, c = stream.state
    np.testing.assert_allclose(state[0][:, 0], h.reshape(state[0][:, 0].shape), atol=1e-5)
    np.testing.assert_allclose(state[1][:, 0], c.reshape(state[1][:, 0].shape), atol=1e-5)


@pytest.mark.slow
def test_onnx_generate_says_what_is_wrong_with_a_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    proc = _run_without_torch(str(bad))
    assert proc.returncode == 2
    assert proc.stderr.startswith("onnx_generate: error: onnxruntime cannot load")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bare_lstm_file_is_not_a_language_model(tmp_path):
    path = to_onnx(glasslstm.LSTM(3, 4), tmp_path / "lstm.onnx")
    with pytest.raises(ValueError, match="not a language model exported by `glasslstm export`"):
        onnx_generate.OnnxLanguageModel(path)


@pytest.mark.slow
def test_bench_onnx_prints_both_runtimes(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--layers", "1", "--hidden", "8", "--tokens", "5", "--reps", "1", "--out", str(out)]
    assert main(["bench", "onnx", *args, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((out / "onnx.json").read_text())
    for section, unit in (("generate", "tokens_per_s"), ("step", "us")):
        for who in ("glasslstm (LMStream)", "onnxruntime"):
            assert res[section][who][unit] > 0
    assert res["model"] == "1x8 char LM, 65 tokens" and res["threads"] == 1


@pytest.mark.slow
def test_onnx_generate_reads_word_and_char_vocabularies_as_glasslstm_does(tmp_path):
    from glasslstm.data import CharTokenizer, WordTokenizer

    words = "Bob is a nice person .\nDan , on the other hand , is <unk> .\n" * 3
    for tok in (WordTokenizer.fit(words, 1), CharTokenizer(sorted(set(words)), unk=True)):
        torch.manual_seed(0)
        cfg = glasslstm.ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=1)
        model = glasslstm.LanguageModel(cfg, tok)
        path = to_onnx(model, tmp_path / f"{tok.level}.onnx")
        lm = onnx_generate.OnnxLanguageModel(path)
        prompt = "Dan is a Zorro\nBob"  # a line break, and a word (characters) not known
        assert lm.encode(prompt) == tok.encode(prompt)
        ids = tok.encode(words)
        assert lm.decode(ids) == tok.decode(ids)
        want = "".join(model.generate(prompt, 30, temperature=0))
        assert "".join(lm.generate(prompt, 30, temperature=0)) == want

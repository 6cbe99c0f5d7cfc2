"""The regularised LSTM family as options of a language model and of `glasslstm train`: the
checks, config.json (new runs carry the options, older runs load without them), embedding
dropout against the NumPy reference, ONNX export refusing what ONNX cannot compute, and
`glasslstm bench variants`."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import numpy as np
import pytest
import torch

import glasslstm.model as model_module
from glasslstm import config
from glasslstm import reference as ref
from glasslstm.cli import main
from glasslstm.data import Corpus
from glasslstm.errors import ConfigError, InvalidValue
from glasslstm.model import LanguageModel, ModelConfig
from glasslstm.trainer import TrainConfig, train

FAMILY_ON = dict(
    layer_norm=True,
    peephole=True,
    cell_clip=5.0,
    zoneout_c=0.2,
    zoneout_h=0.1,
    recurrent_dropout=0.2,
    input_dropout=0.3,
    output_dropout=0.25,
    weight_dropout=0.3,
    embed_dropout=0.1,
)
TEXT = ("Bob is a nice person. Dan, on the other hand, is evil. Bob can swim. " * 20).encode()
CORPUS = Corpus("tiny", TEXT[: int(len(TEXT) * 0.9)], TEXT[int(len(TEXT) * 0.9) :], "test")
TINY = dict(hidden=16, layers=2, seq_len=12, batch_size=4, eval_every=4, log_every=2, warmup=1)


def test_the_family_options_are_the_same_in_both_configs_and_the_model():
    train_fields = {f.name for f in fields(TrainConfig)}
    model_fields = {f.name: f.default for f in fields(ModelConfig)}
    for name in config.FAMILY:
        assert name in train_fields and name in config.TRAIN_HELP
        assert model_fields[name] in (False, 0.0)  # off unless asked for
    cfg = TrainConfig(**FAMILY_ON).model_config(50)
    assert {n: getattr(cfg, n) for n in config.FAMILY} == FAMILY_ON
    lm = LanguageModel(ModelConfig(vocab_size=50, hidden_size=8, num_layers=3, **FAMILY_ON))
    lstm = lm.lstm
    assert lstm.layer_norm and lstm.peephole and lstm.cell_clip == 5.0
    assert (lstm.zoneout_c, lstm.zoneout_h, lstm.recurrent_dropout) == (0.2, 0.1, 0.2)
    assert lstm.input_dropout == (0.3, 0.0, 0.0)  # the embedded tokens only
    assert lstm.output_dropout == (0.25,) * 3 and lstm.weight_dropout == 0.3


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("zoneout_c", 1.0, "a finite number in [0, 1) (0: off)"),
        ("recurrent_dropout", -0.1, "in [0, 1)"),
        ("embed_dropout", "0.1", "a finite number"),
        ("cell_clip", -2.0, "a finite number >= 0 (0: no clipping)"),
        ("layer_norm", 1, "true or false"),
    ],
)
def test_bad_family_values_are_refused_by_the_configs(key, value, expected):
    with pytest.raises(InvalidValue, match="not valid") as e:
        TrainConfig(**{key: value})
    assert expected in str(e.value)
    with pytest.raises(InvalidValue, match=f"ModelConfig.{key}"):
        ModelConfig(vocab_size=10, **{key: value})


def test_train_refuses_a_bad_family_value_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--weight-dropout", "1.5", "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("glasslstm train:")]
    assert len(err) == 1 and "--weight-dropout=1.5 is not valid" in err[0]
    assert not out.exists()


def test_train_help_says_what_each_family_option_means():
    from glasslstm.cli import build_parser

    sub = next(
        a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"
    ).choices["train"]
    text = " ".join(sub.format_help().split())
    for flag in ("--layer-norm", "--zoneout-c", "--weight-dropout", "--embed-dropout"):
        assert flag in text
    assert "probability that a unit of the cell state keeps its previous value" in text
    assert "clip the cell state C_t to [-v, v] at every step (0: no clipping)" in text


@pytest.mark.slow
def test_a_run_with_the_family_stores_it_loads_and_resumes(tmp_path):
    out = tmp_path / "family"
    cfg = TrainConfig(**TINY, **FAMILY_ON, max_steps=4, out=str(out))
    first = train(cfg, progress=False, corpus=CORPUS)
    assert first.step == 4
    saved = json.loads((out / "config.json").read_text())
    for name, value in FAMILY_ON.items():
        assert saved["model"][name] == value and saved["train"][name] == value
    model = LanguageModel.load(out)
    assert model.lstm.layer_norm and model.lstm.zoneout_c == 0.2
    assert "lstm.ln_weight_hh_l1" in dict(model.named_parameters())
    resumed = train(resume=out, overrides={"max_steps": 6}, progress=False, corpus=CORPUS)
    assert resumed.step == 6 and resumed.stopped == "max_steps"
    with pytest.raises(ConfigError, match="--zoneout-c cannot change when resuming"):
        train(resume=out, overrides={"zoneout_c": 0.5}, progress=False, corpus=CORPUS)


def test_a_run_written_before_the_family_loads_with_it_off(tiny_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    path = old / "config.json"
    cfg = json.loads(path.read_text())
    for section in ("model", "train"):
        for name in config.FAMILY:
            cfg[section].pop(name, None)
    path.write_text(json.dumps(cfg))
    model = LanguageModel.load(old)
    assert not model.lstm.layer_norm and model.config.embed_dropout == 0.0
    assert model.lstm.plain_cell and not model.lstm.draws_masks
    with torch.no_grad():
        want = LanguageModel.load(tiny_run)(torch.tensor([[1, 2, 3]]))[0]
        assert torch.equal(model(torch.tensor([[1, 2, 3]]))[0], want)


# ---------------------------------------------------------------- embedding dropout


def test_reference_embedding_backward_matches_finite_differences():
    """Through the embedding (a repeated token, dropped and kept rows) and a 2-layer LSTM."""
    rng = np.random.default_rng(0)
    V, I, H, T, B = 6, 3, 4, 5, 2
    E = rng.standard_normal((V, I))
    idx = rng.integers(0, V, size=(T, B))
    idx[0, 0] = idx[3, 1] = 2
    mask = np.array([2.0, 0.0, 2.0, 2.0, 0.0, 2.0])  # p = 0.5: 0 or 1/(1-p)
    params = ref.init_params(I, H, 2, rng)
    R = rng.standard_normal((T, B, H))

    def loss():
        return (ref.forward(ref.embed_forward(E, idx, mask), params)[0] * R).sum()

    out, _, cache = ref.forward(ref.embed_forward(E, idx, mask), params)
    dE = ref.embed_backward(ref.backward(cache, R).dx, idx, V, mask)
    numeric = np.zeros_like(E)
    for k in np.ndindex(E.shape):
        old = E[k]
        E[k] = old + 1e-6
        up = loss()
        E[k] = old - 1e-6
        numeric[k] = (up - loss()) / 2e-6
        E[k] = old
    np.testing.assert_allclose(dE, numeric, rtol=1e-6, atol=1e-8)
    assert not dE[[1, 4]].any() and dE[2].any()  # dropped types learn nothing at this step


def test_language_model_embedding_dropout_is_the_reference(monkeypatch):
    """One draw per token type, the same at every occurrence; the embedding's gradient is the
    reference's with the mask the model drew; off in evaluation."""
    drawn = []

    def spy(weight, p):
        m = real(weight, p)
        drawn.append(m.clone())
        return m

    real = model_module._row_mask
    monkeypatch.setattr(model_module, "_row_mask", spy)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=7, hidden_size=5, num_layers=1, dropout=0.0, embed_dropout=0.5)
    lm = LanguageModel(cfg).double().train()
    idx = torch.tensor([[1, 2, 1, 3, 2, 1], [4, 1, 5, 6, 0, 2]])
    seen = {}
    lm.lstm.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    logits = lm(idx)[0]
    x = seen["x"]
    x.retain_grad()
    logits.pow(2).sum().backward()
    (mask,) = drawn
    assert mask.shape == (7, 1) and set(mask.flatten().tolist()) <= {0.0, 2.0}
    E = lm.embedding.weight.detach().numpy()
    m = mask[:, 0].numpy()
    ids = idx.numpy()
    np.testing.assert_allclose(x.detach().numpy(), ref.embed_forward(E, ids, m), atol=0)
    want = ref.embed_backward(x.grad.numpy(), ids, 7, m)
    np.testing.assert_allclose(lm.embedding.weight.grad.numpy(), want, rtol=1e-12, atol=1e-14)
    lm.eval()
    with torch.no_grad():
        np.testing.assert_allclose(lm(idx)[0].numpy(), lm(idx)[0].numpy())
        lm(idx)
    assert len(drawn) == 1  # evaluation draws nothing


# ---------------------------------------------------------------- export, bench


def test_onnx_export_refuses_a_cell_onnx_does_not_have():
    from glasslstm.export import check_exportable
    from glasslstm.lstm import LSTM

    with pytest.raises(ConfigError, match="no layer normalisation, zoneout"):
        check_exportable(LSTM(3, 4, zoneout_h=0.1))
    check_exportable(LSTM(3, 4, recurrent_dropout=0.3, weight_dropout=0.2))  # dropouts: fine


@pytest.mark.slow
def test_bench_variants_prints_every_member_against_plain_and_loop(tmp_path, capsys):
    from glasslstm.bench.variants import MEMBERS

    assert tuple(MEMBERS) == config.VARIANT_MEMBERS  # what --help lists is what runs
    argv = ["bench", "variants", "--members", "layer_norm,zoneout", "--hidden", "8"]
    argv += ["--T", "3", "--batch-size", "2", "--reps", "1", "--out", str(tmp_path)]
    assert main([*argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads((tmp_path / "variants.json").read_text())
    assert list(res["members"]) == ["layer_norm", "zoneout"] and res["H"] == 8
    for r in res["members"].values():
        assert set(r["ms"]) == {"plain", "fused", "loop"} and min(r["ms"].values()) > 0
        assert r["vs_plain"] > 0 and r["vs_loop"] > 0
    assert res["members"]["zoneout"]["options"] == {"zoneout_c": 0.5, "zoneout_h": 0.05}
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| layer_norm | layer_norm=True |" in table and "fused vs loop" in table
    assert main(["bench", "variants", "--members", "dropconnect", "--out", str(tmp_path)]) == 2
    assert "unknown ['dropconnect']" in capsys.readouterr().err

"""LanguageModel.save(dir) / load(dir): a run directory written from Python, read back from
Python and by the command line as a training run's directory is."""

import json

import pytest
import torch

from glasslstm import rundir
from glasslstm.cli import main
from glasslstm.data import CharTokenizer, WordTokenizer
from glasslstm.errors import ConfigError, RunDirError
from glasslstm.model import LanguageModel, ModelConfig

TEXT = "the brave bob served in the navy. dan is evil. "


def trained_model(**kw) -> LanguageModel:
    """A small char model after a few optimizer steps (weights unlike any fresh init)."""
    tok = CharTokenizer(sorted(set(TEXT)))
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=24, num_layers=2, **kw)
    model = LanguageModel(cfg, tok)
    ids = torch.tensor(tok.encode(TEXT * 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        _, loss, _ = model(ids[:-1][None], targets=ids[1:][None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"proj_size": 8, "tie_weights": True, "dropout": 0.0}])
def test_save_then_load_gives_the_same_model(tmp_path, kw):
    model = trained_model(**kw)
    assert model.save(tmp_path / "run") == tmp_path / "run"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["format_version"] == rundir.FORMAT_VERSION and config["kind"] == rundir.RUN_KIND
    assert config["model"] == model.config_dict() and "glasslstm_version" in config

    loaded = LanguageModel.load(tmp_path / "run")
    assert not loaded.training and loaded.config == model.config
    assert loaded.tokenizer == model.tokenizer
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    if model.config.tie_weights:
        assert loaded.head.weight is loaded.embedding.weight
    idx = torch.tensor([model.tokenizer.encode("bob is brave")])
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_the_command_line_reads_a_saved_model_as_a_run(tmp_path, capsys):
    model = trained_model()
    run = str(model.save(tmp_path / "run"))
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT * 3)

    assert main(["sample", run, "--prompt", "bob", "--length", "30", "--temperature", "0"]) == 0
    assert (
        capsys.readouterr().out == "bob" + "".join(model.generate("bob", 30, temperature=0)) + "\n"
    )

    assert main(["predict", run, "the brave", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["next"]
    want = model.predict_next("the brave", top=5)
    assert [(g["token"], round(g["prob"], 6)) for g in got] == [
        (w.text, round(w.prob, 6)) for w in want
    ]

    assert main(["eval", run, "--data", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    # no training corpus recorded: the command says to name the text
    assert main(["eval", run]) == 2
    err = capsys.readouterr().err.strip()
    assert "records no training data" in err and "--data FILE" in err
    assert len(err.splitlines()) == 1


def test_a_model_without_tokenizer_round_trips_and_commands_say_so(tmp_path, capsys):
    torch.manual_seed(1)
    model = LanguageModel(ModelConfig(vocab_size=7, hidden_size=8, num_layers=1)).eval()
    model.save(tmp_path / "run")
    assert not (tmp_path / "run" / "vocab.json").exists()
    loaded = LanguageModel.load(tmp_path / "run")
    assert loaded.tokenizer is None
    idx = torch.tensor([[1, 2, 3, 6]])
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert main(["sample", str(tmp_path / "run"), "--length", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no tokenizer" in err and len(err.splitlines()) == 1


def test_saving_again_replaces_an_earlier_save(tmp_path):
    first = trained_model()
    first.save(tmp_path / "run")
    tok = WordTokenizer(["<unk>", "<eos>", "bob", "navy"])
    second = LanguageModel(ModelConfig(vocab_size=4, hidden_size=8, num_layers=1), tok).eval()
    second.save(tmp_path / "run")
    loaded = LanguageModel.load(tmp_path / "run")
    assert loaded.config == second.config and loaded.tokenizer == tok
    # and a model without a tokenizer does not inherit the earlier save's vocab.json
    LanguageModel(ModelConfig(vocab_size=4, hidden_size=8, num_layers=1)).save(tmp_path / "run")
    assert LanguageModel.load(tmp_path / "run").tokenizer is None


def test_save_refuses_what_is_not_its_own(tmp_path):
    model = trained_model()
    with pytest.raises(ConfigError, match=r"\.safetensors file: pass a directory.*save_weights"):
        model.save(tmp_path / "model.safetensors")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and is not a glasslstm run directory"):
        model.save(tmp_path / "notes")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]

    training_run = tmp_path / "train-run"
    rundir.write_config(training_run, {"model": model.config_dict(), "train": {"lr": 0.01}})
    before = (training_run / "config.json").read_bytes()
    with pytest.raises(ConfigError, match="holds a training run"):
        model.save(training_run)
    assert (training_run / "config.json").read_bytes() == before
    assert not (training_run / "model.safetensors").exists()


def test_save_weights_writes_the_bare_weights_file(tmp_path):
    model = trained_model()
    model.save_weights(tmp_path / "w.safetensors", metadata={"step": "5"})
    tensors = rundir.load_tensors(tmp_path / "w.safetensors")
    assert tensors.keys() == model.state_dict().keys()
    with pytest.raises(RunDirError, match="is a file, not a glasslstm run directory"):
        LanguageModel.load(tmp_path / "w.safetensors")

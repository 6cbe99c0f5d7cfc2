"""Options: one set of rules for TrainConfig, ModelConfig, sampling, evaluation and the command
line, checked before any work starts; devices, output paths and memory checked up front."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

import glasslstm
from glasslstm import options
from glasslstm.cli import main
from glasslstm.errors import ConfigError, InvalidValue
from glasslstm.model import LanguageModel, ModelConfig
from glasslstm.trainer import TrainConfig, evaluate, train


def one_error_line(capsys, command: str) -> str:
    """The command's stderr, which must be exactly one error line (after the start notice)."""
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("glasslstm: training")]
    assert len(err) == 1, err
    assert err[0].startswith(f"glasslstm {command}: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--embed", "-1", "--embed=-1 is not valid; expected an int >= 0"),
        ("--weight-decay", "-1", "--weight-decay=-1.0 is not valid; expected a finite number >= 0"),
        ("--min-freq", "0", "--min-freq=0 is not valid; expected an int >= 1"),
        ("--seed", "99999999999999999999999", "expected an int in [0, 4294967295]"),
        ("--forget-bias", "nan", "--forget-bias=nan is not valid; expected a finite number"),
        ("--forget-bias", "inf", "--forget-bias=inf is not valid"),
        ("--dropout", "1.5", "--dropout=1.5 is not valid; expected a finite number in [0, 1)"),
        ("--lr", "0", "--lr=0.0 is not valid; expected a finite number > 0"),
        ("--momentum", "-0.5", "--momentum=-0.5 is not valid"),
        ("--threads", "1000000", "--threads=1000000 is not valid; expected an int in [0, 1024]"),
        ("--device", "foo", "--device='foo' is not valid; expected auto, cpu, cuda, cuda:N or mps"),
        ("--level", "morse", "expected one of char, word, byte"),
        ("--cell", "gru", "--cell='gru' is not valid; expected one of lstm, rnn"),
        ("--chrono-init", "1", "--chrono-init=1 is not valid; expected an int >= 0 (0: off"),
        ("--answer-weight", "0", "--answer-weight=0.0 is not valid; expected a finite number > 0"),
        ("--answers", "(unclosed", "--answers is not a regular expression"),
        ("--curriculum", "-1", "--curriculum=-1 is not valid; expected an int >= 0"),
    ],
)
def test_train_options_are_refused_before_anything_starts(tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    assert main(["train", flag, value, "--out", str(out)]) == 2
    assert message in one_error_line(capsys, "train")
    assert not out.exists()  # nothing was started, so nothing is half done


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("hidden", True, "an int >= 1"),  # a bool is not a size
        ("hidden", 2.0, "an int >= 1"),
        ("tie_weights", "yes", "true or false"),
        ("dropout", "x", "a finite number in [0, 1)"),
        ("forget_bias", "abc", "a finite number"),
        ("seq_len", 0, "an int >= 1"),
        ("data", 3, "a string or none"),
    ],
)
def test_train_config_from_python_gets_the_same_rules(key, value, expected):
    with pytest.raises(InvalidValue) as caught:
        TrainConfig(**{key: value})
    e = caught.value
    assert (e.key, e.found, e.expected) == (key, value, expected)
    assert str(e) == f"--{key.replace('_', '-')}={value!r} is not valid; expected {expected}"


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"cell": "rnn", "chrono_init": 8}, "--chrono-init and --checkpoint are LSTM options"),
        ({"batching": "stream", "curriculum": 5}, "add --batching documents"),
        ({"batching": "random", "answers": "x"}, "add --batching documents"),
    ],
)
def test_options_that_must_agree(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)


def test_tied_weights_need_a_matching_embedding():
    with pytest.raises(ConfigError, match="--tie-weights needs .* --embed 0 or --embed 64"):
        TrainConfig(hidden=64, embed=32, tie_weights=True)
    assert TrainConfig(hidden=64, embed=64, tie_weights=True).embed == 64


def test_model_config_rules():
    with pytest.raises(InvalidValue, match=r"ModelConfig.hidden_size=True is not valid"):
        ModelConfig(vocab_size=5, hidden_size=True)
    with pytest.raises(InvalidValue, match=r"ModelConfig.forget_bias=nan .* a finite number"):
        ModelConfig(vocab_size=5, forget_bias=math.nan)
    with pytest.raises(InvalidValue, match=r"ModelConfig.vocab_size=0 .* an int >= 1"):
        ModelConfig(vocab_size=0)


def test_a_field_without_a_rule_is_checked_against_its_default():
    @dataclass(frozen=True)
    class Extra:
        steps: int = 3
        rate: float = 0.5
        name: str | None = None
        on: bool = False

    options.check_fields(Extra(), {})
    for key, bad in (("steps", "3"), ("rate", math.inf), ("name", 1), ("on", 1)):
        with pytest.raises(InvalidValue, match=f"--{key}="):
            options.check_fields(Extra(**{key: bad}), {})


@pytest.mark.parametrize("bias", [math.nan, math.inf, -math.inf])
def test_lstm_refuses_a_forget_bias_that_is_not_finite(bias):
    with pytest.raises(ValueError, match="forget_bias must be finite"):
        glasslstm.LSTM(4, 8, forget_bias=bias)


@pytest.mark.parametrize("bias", ["1.0", True, None])
def test_lstm_refuses_a_forget_bias_that_is_not_a_number(bias):
    with pytest.raises(TypeError, match="forget_bias must be a number"):
        glasslstm.LSTM(4, 8, forget_bias=bias)


def test_lstm_still_takes_any_finite_forget_bias():
    lstm = glasslstm.LSTM(4, 8, forget_bias=2)
    assert torch.isfinite(lstm.bias_ih_l0).all()


# ------------------------------------------------------------------------ devices


def test_device_names():
    assert options.resolve_device("cpu") == torch.device("cpu")
    assert options.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(InvalidValue, match="--device='foo' is not valid"):
        options.resolve_device("foo")
    with pytest.raises(InvalidValue, match="--device='meta'"):  # a torch device, not a place
        options.resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_it(tiny_run, capsys):
    with pytest.raises(ConfigError, match="no CUDA device.*--device cpu"):
        options.resolve_device("cuda")
    assert main(["sample", str(tiny_run), "--device", "cuda", "--length", "3"]) == 2
    assert "--device=cuda but this machine has no CUDA device" in one_error_line(capsys, "sample")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_device_number_beyond_those_present():
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"has {n} CUDA device"):
        options.resolve_device(f"cuda:{n}")


# ------------------------------------------------------------------------ commands


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sample", "{run}", "--device", "foo"], "--device='foo' is not valid"),
        (["sample", "{run}", "--length", "-1"], "--length=-1 is not valid; expected an int >= 0"),
        (["sample", "{run}", "--top-p", "0"], "--top-p=0.0 is not valid"),
        (["sample", "{run}", "--seed", "-3"], "--seed=-3 is not valid"),
        (["sample", "{run}", "--temperature", "inf"], "--temperature=inf is not valid"),
        (["eval", "{run}", "--seq-len", "0"], "--seq-len=0 is not valid; expected an int >= 1"),
        (["eval", "{run}", "--batch-size", "0"], "--batch-size=0 is not valid"),
        (["predict", "{run}", "Bob", "--top", "0"], "--top=0 is not valid"),
        (
            ["inspect", "{run}", "--text", "Bob", "--html", "/missing/dir/x.html"],
            "--html='/missing/dir/x.html' is not valid; expected a file path in an existing "
            "folder (/missing/dir does not exist",
        ),
        (
            ["inspect", "{run}", "--text", "Bob", "--png", "/missing/dir/x.png"],
            "(/missing/dir does not exist",
        ),
        (["inspect", "{run}", "--text", "Bob", "--html", "{tmp}"], "is a folder"),
        (["inspect", "{run}", "--text", "Bob", "--html", "/dev/null"], "not a regular file"),
        (["cells", "{run}", "--data", "stories", "--png", "/missing/x.png"], "does not exist"),
    ],
)
def test_command_options_are_refused_with_one_line(tiny_run, tmp_path, capsys, argv, message):
    argv = [a.replace("{run}", str(tiny_run)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert message in one_error_line(capsys, argv[0])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--seed", "99999999999999999999999"], "--seed=99999999999999999999999 is not"),
        (["bench", "memory", "--budget", "0"], "--budget=0 is not valid; expected an int >= 1"),
        (["bench", "memory", "--lr", "nan"], "--lr=nan is not valid"),
        (["bench", "gradient", "--hidden", "0"], "--hidden=0 is not valid"),
        (["bench", "speed", "--reps", "0"], "--reps=0 is not valid"),
    ],
)
def test_demo_and_bench_options(tmp_path, capsys, argv, message):
    assert main([*argv, *(["--out", str(tmp_path / "b")] if argv[0] == "bench" else [])]) == 2
    assert message in one_error_line(capsys, argv[0])
    assert not (tmp_path / "b").exists()


def test_a_tiny_temperature_samples_the_argmax(tiny_run, capsys):
    """1e-45 once overflowed to inf/nan probabilities; it is the argmax in the limit."""
    args = ["sample", str(tiny_run), "--prompt", "Bob", "--length", "30", "--seed", "1"]
    assert main([*args, "--temperature", "1e-45"]) == 0
    tiny = capsys.readouterr().out
    assert main([*args, "--temperature", "0"]) == 0
    assert tiny == capsys.readouterr().out


def test_evaluate_checks_its_arguments(tiny_run):
    model = LanguageModel.load(tiny_run)
    with pytest.raises(InvalidValue, match="seq_len=0 is not valid"):
        evaluate(model, list(range(10)), seq_len=0)
    with pytest.raises(InvalidValue, match="batch_size=-1 is not valid"):
        evaluate(model, list(range(10)), batch_size=-1)


# ------------------------------------------------------------------------ paths


def test_data_paths_are_made_absolute_and_names_stay_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    assert options.resolve_data("small.txt") == str(tmp_path / "small.txt")
    assert options.resolve_data("folder") == str(tmp_path / "folder")
    assert options.resolve_data("stories") == "stories"
    assert options.resolve_data(None) is None
    assert options.resolve_data("missing.txt") == "missing.txt"  # loading it will say so
    got = options.resolve_paths({"data_dir": "d", "out": "runs/x", "hidden": 3})
    assert got == {"data_dir": str(tmp_path / "d"), "out": str(tmp_path / "runs/x"), "hidden": 3}


# ------------------------------------------------------------------------ memory


@pytest.mark.parametrize(
    "kw",
    [
        dict(vocab_size=11, hidden_size=8, num_layers=2),
        dict(vocab_size=11, hidden_size=8, num_layers=3, embed_size=5),
        dict(vocab_size=11, hidden_size=8, num_layers=2, proj_size=3),
        dict(vocab_size=11, hidden_size=8, num_layers=1, tie_weights=True),
        dict(vocab_size=11, hidden_size=8, num_layers=2, layer_norm=True, peephole=True),
        dict(vocab_size=11, hidden_size=8, num_layers=2, proj_size=3, layer_norm=True),
    ],
)
def test_parameter_shapes_are_the_models(kw):
    model = LanguageModel(ModelConfig(**kw))
    shapes = options.parameter_shapes(
        kw["vocab_size"],
        kw["hidden_size"],
        kw["num_layers"],
        embed_size=kw.get("embed_size", 0),
        proj_size=kw.get("proj_size", 0),
        layer_norm=kw.get("layer_norm", False),
        peephole=kw.get("peephole", False),
    )
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = kw.get("tie_weights", False)
    assert options.count_parameters(shapes, tie_weights=tied) == model.num_parameters()


def test_training_memory_counts_state_and_activations():
    cfg = TrainConfig(hidden=16, layers=2, batch_size=4, seq_len=8)
    est = options.training_memory(cfg, 10)
    params = LanguageModel(cfg.model_config(10)).num_parameters()
    assert est.parameters == params and est.state == params * 4 * 4  # weights, grads, 2 moments
    sgd = options.training_memory(TrainConfig(hidden=16, optimizer="sgd", momentum=0.0), 10)
    assert sgd.state == sgd.parameters * 4 * 2
    long = TrainConfig(hidden=16, layers=2, batch_size=4, seq_len=4096)
    segmented = options.training_memory(replace(long, checkpoint=64), 10)
    assert segmented.activations < 0.5 * options.training_memory(long, 10).activations


def test_a_run_too_big_for_the_machine_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "big"
    assert main(["train", "--hidden", "200000", "--out", str(out)]) == 2
    line = one_error_line(capsys, "train")
    assert "training needs about" in line and "TB of memory" in line
    assert "this machine has" in line and "available; lower --hidden" in line
    assert not out.exists()


def test_memory_check_uses_what_the_device_has(monkeypatch):
    cfg = TrainConfig(hidden=64, layers=1, batch_size=2, seq_len=8)
    need = options.training_memory(cfg, 10).total
    monkeypatch.setattr(options, "available_memory", lambda device: need - 1)
    with pytest.raises(ConfigError, match=r"needs about .* but this machine has .* available"):
        options.check_training_memory(cfg, 10, torch.device("cpu"))
    monkeypatch.setattr(options, "available_memory", lambda device: need)
    options.check_training_memory(cfg, 10, torch.device("cpu"))
    monkeypatch.setattr(options, "available_memory", lambda device: None)  # cannot tell: go on
    options.check_training_memory(cfg, 10**9, torch.device("cpu"))


def test_available_memory_is_a_plausible_number():
    have = options.available_memory(torch.device("cpu"))
    assert have is None or 0 < have < 2**50


def test_train_api_checks_memory_before_loading_the_corpus(tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the corpus was loaded before the options were checked")

    monkeypatch.setattr("glasslstm.trainer.load_corpus", never)
    with pytest.raises(ConfigError, match="training needs about"):
        train(TrainConfig(hidden=300_000, out=str(tmp_path / "r")), progress=False)

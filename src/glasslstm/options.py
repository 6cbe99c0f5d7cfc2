"""What every option may be, checked in one place before any work starts.

One :class:`Rule` per value (its type, range or choices) for the training configuration
(:class:`~glasslstm.trainer.TrainConfig`), the model's (:class:`~glasslstm.model.ModelConfig`),
sampling and evaluation. The dataclasses' constructors, the library functions and the command
line all check against these rules, so ``glasslstm train --dropout 1.5``,
``TrainConfig(dropout=1.5)`` and a config.json with ``"dropout": 1.5`` get the same answer:
an :class:`~glasslstm.errors.InvalidValue` naming the key, the value found and what was
expected. Also here: the device (:func:`resolve_device`), paths given for output files and
corpora, and the memory a run needs against what the machine has (:func:`check_memory`).
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from glasslstm.errors import ConfigError, InvalidValue, format_bytes

if TYPE_CHECKING:  # torch is imported where a device or memory is checked, not at import
    import torch

LEVELS = ("char", "word", "byte")  # what a token is: a character, a word, a byte of UTF-8
NAMED_CORPORA = ("stories", "shakespeare")  # --data names that need no file

PRECISIONS = ("fp32", "bf16")
CELLS = ("lstm", "rnn")  # the recurrent core: the LSTM, or the vanilla RNN to compare with
SEED_MAX = 2**32 - 1  # numpy's seeds end here; the trainer derives batch seeds from it
MAX_THREADS = 1024  # torch accepts far more and then crashes at exit
MIN_BPTT = 5  # --variable-bptt's shortest window (Merity et al. 2017)


@dataclass(frozen=True)
class Rule:
    """What one value may be. ``kind``: int, number (int or float, finite), bool, text,
    choice, device (a torch device name or auto) or outfile (a path in an existing folder).
    ``low``/``high`` bound numbers (``*_open``: the bound itself is excluded); ``optional``
    allows None; ``note`` says what a special value means ("0: off")."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    note: str = ""

    def expected(self) -> str:
        """What the value should be, in words: ``an int >= 1``, ``a number in [0, 1)``."""
        what = {
            "int": "an int",
            "number": "a finite number",
            "bool": "true or false",
            "text": "a string",
            "choice": "one of " + ", ".join(self.choices),
            "device": "auto, cpu, cuda, cuda:N or mps",
            "outfile": "a file path in an existing folder",
        }[self.kind]
        if self.low is not None and self.high is not None:
            what += f" in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
            what += ")" if self.high_open else "]"
        elif self.low is not None:
            what += f" {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            what += f" {'<' if self.high_open else '<='} {_num(self.high)}"
        if self.optional and self.kind != "outfile":  # an output file that is optional: not given
            what += " or none"
        return what + (f" ({self.note})" if self.note else "")

    def problem(self, value) -> str | None:
        """None when ``value`` follows the rule, else what was expected (and why not)."""
        if value is None:
            return None if self.optional else self.expected()
        if self.kind == "outfile":
            return _outfile_problem(value, self)
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": is_finite_number,
            "bool": lambda v: isinstance(v, bool),
            "text": lambda v: isinstance(v, str),
            "choice": lambda v: isinstance(v, str) and v in self.choices,
            "device": _parses_as_device,
        }[self.kind](value)
        if not ok or not self._in_range(value):
            return self.expected()
        return None

    def _in_range(self, value) -> bool:
        if self.kind not in ("int", "number"):
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def is_finite_number(v) -> bool:
    """A real number (an int or float, not a bool) that is neither NaN nor infinite."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _parses_as_device(v) -> bool:
    if not isinstance(v, str):
        return False
    if v == "auto":
        return True
    import torch

    try:
        return torch.device(v).type in ("cpu", "cuda", "mps")
    except (RuntimeError, ValueError):
        return False


def _outfile_problem(value, rule: Rule) -> str | None:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        return rule.expected()
    path = Path(value).expanduser()
    folder = path.parent
    if path.is_dir():
        return f"{rule.expected()} ({path} is a folder)"
    if path.exists() and not path.is_file():  # a device or a pipe: never replaced by a file
        return f"{rule.expected()} ({path} is not a regular file)"
    if not folder.is_dir():
        return f"{rule.expected()} ({folder} does not exist; create it or write elsewhere)"
    if not os.access(folder, os.W_OK):
        return f"{rule.expected()} ({folder} is not writable)"
    return None


# Shorthands for the tables below.
def integer(low=None, high=None, note: str = "", optional: bool = False) -> Rule:
    return Rule("int", low=low, high=high, note=note, optional=optional)


def number(low=None, high=None, *, low_open=False, high_open=False, note="", optional=False):
    return Rule(
        "number",
        low=low,
        high=high,
        low_open=low_open,
        high_open=high_open,
        note=note,
        optional=optional,
    )


def choice(*names: str) -> Rule:
    return Rule("choice", choices=names)


FLAG = Rule("bool")
TEXT = Rule("text", optional=True)
DEVICE = Rule("device")
OUTFILE = Rule("outfile", optional=True)
SEED = integer(0, SEED_MAX)
PROBABILITY = number(0, 1, high_open=True)
CHRONO = integer(0, note="0: off; else the longest dependency in tokens, >= 2")

# The regularised LSTM family's options (the same in TrainConfig and ModelConfig).
OFF_OR_PROBABILITY = number(0, 1, high_open=True, note="0: off")
FAMILY_RULES: dict[str, Rule] = {
    "layer_norm": FLAG,
    "peephole": FLAG,
    "cell_clip": number(0, note="0: no clipping"),
    "zoneout_c": OFF_OR_PROBABILITY,
    "zoneout_h": OFF_OR_PROBABILITY,
    "recurrent_dropout": OFF_OR_PROBABILITY,
    "input_dropout": OFF_OR_PROBABILITY,
    "output_dropout": OFF_OR_PROBABILITY,
    "weight_dropout": OFF_OR_PROBABILITY,
    "embed_dropout": OFF_OR_PROBABILITY,
}

# TrainConfig's fields (the train command's options, config.json's "train").
TRAIN: dict[str, Rule] = {
    "data": TEXT,
    "train": TEXT,
    "valid": TEXT,
    "test": TEXT,
    "data_dir": TEXT,
    "level": choice(*LEVELS),
    "min_freq": integer(1),
    "hidden": integer(1),
    "layers": integer(1),
    "dropout": PROBABILITY,
    "embed": integer(0, note="0: the LSTM's output size"),
    "tie_weights": FLAG,
    "forget_bias": number(),
    "chrono_init": CHRONO,
    "cell": choice(*CELLS),
    "seq_len": integer(1),
    "batching": choice("stream", "random", "documents"),
    "curriculum": integer(0, note="steps on the shortest documents first; 0: off"),
    "answers": TEXT,
    "answer_weight": number(0, low_open=True, note="1: every token alike"),
    "batch_size": integer(1),
    "optimizer": choice("adamw", "sgd", "ntasgd"),
    "lr": number(0, low_open=True),
    "weight_decay": number(0),
    "momentum": PROBABILITY,
    "nonmono": integer(1, note="validations"),
    "ema": number(0, 1, high_open=True, note="0: off"),
    "variable_bptt": FLAG,
    "ar": number(0, note="0: off"),
    "tar": number(0, note="0: off"),
    "schedule": choice("cosine", "constant"),
    "warmup": integer(0),
    "min_lr_ratio": number(0, 1),
    "clip": number(0, note="0: off"),
    "max_steps": integer(0, note="0: no limit, with --time-budget"),
    "time_budget": number(0, note="seconds; 0: none"),
    "eval_every": integer(1),
    "eval_batches": integer(0, note="0: the whole split"),
    "patience": integer(0, note="0: off"),
    "log_every": integer(1),
    "seed": SEED,
    "device": DEVICE,
    "threads": integer(0, MAX_THREADS, note="0: torch's default"),
    "checkpoint": integer(0, note="0: off"),
    **FAMILY_RULES,
    "deterministic": FLAG,
    "precision": choice(*PRECISIONS),
    "out": TEXT,
}

# ModelConfig's fields (config.json's "model").
MODEL: dict[str, Rule] = {
    "vocab_size": integer(1),
    "hidden_size": integer(1),
    "num_layers": integer(1),
    "dropout": PROBABILITY,
    "embed_size": integer(0, note="0: the LSTM's output size"),
    "tie_weights": FLAG,
    "forget_bias": number(),
    "chrono_init": CHRONO,
    "cell": choice(*CELLS),
    "proj_size": integer(0, note="0: none"),
    "checkpoint": integer(0, note="0: off"),
    **FAMILY_RULES,
}

# LanguageModel.generate and `glasslstm sample`.
SAMPLING: dict[str, Rule] = {
    "length": integer(0),
    "temperature": number(0, note="0: the argmax"),
    "top_k": integer(0, note="0: off"),
    "top_p": number(0, 1, low_open=True, note="1: off"),
    "seed": integer(0, SEED_MAX, optional=True),
}

# trainer.evaluate and `glasslstm eval`.
EVALUATION: dict[str, Rule] = {
    "batch_size": integer(1),
    "seq_len": integer(1),
    "max_batches": integer(0, note="0: all"),
}


def flag_name(key: str) -> str:
    """How the command line spells an option: ``seq_len`` -> ``--seq-len``."""
    return "--" + key.replace("_", "-")


def check(values: Mapping, rules: Mapping[str, Rule], *, name: Callable[[str], str] = flag_name):
    """Check each key of ``values`` that has a rule; the first that breaks it raises
    :class:`InvalidValue` (its message names the key as ``name(key)``)."""
    for key, rule in rules.items():
        if key in values:
            expected = rule.problem(values[key])
            if expected is not None:
                raise InvalidValue(key, values[key], expected, name=name(key))


def check_fields(obj, rules: Mapping[str, Rule], *, name: Callable[[str], str] = flag_name):
    """Check a config dataclass: each field against its rule, or, for a field without one,
    against the type of its default (so a new field is never unchecked)."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    inferred = {f.name: _rule_from_default(f.default) for f in fields(obj) if f.name not in rules}
    check(values, {**rules, **{k: r for k, r in inferred.items() if r is not None}}, name=name)


def _rule_from_default(default) -> Rule | None:
    if isinstance(default, bool):
        return FLAG
    if isinstance(default, int):
        return integer()
    if isinstance(default, float):
        return number()
    if default is None or isinstance(default, str):
        return TEXT
    return None


def check_chrono(value, *, name: str) -> None:
    """chrono_init is 0 (off) or a time scale of at least 2 tokens (log U[1, T - 1] needs it)."""
    if value == 1:
        raise InvalidValue("chrono_init", value, CHRONO.expected(), name=name)


def check_train(cfg) -> None:
    """A TrainConfig: each option against :data:`TRAIN`, then the ones that must agree."""
    check_fields(cfg, TRAIN)
    if cfg.data is not None and cfg.train is not None:
        raise ConfigError(
            f"--data {cfg.data} and --train {cfg.train} both name the training text; give "
            "--data (a file, or a folder with train/valid/test files) or --train FILE "
            "[--valid FILE] [--test FILE]"
        )
    if cfg.train is None and (cfg.valid is not None or cfg.test is not None):
        given = "--valid" if cfg.valid is not None else "--test"
        raise ConfigError(f"{given} needs --train FILE (the training split) beside it")
    if cfg.max_steps == 0 and not cfg.time_budget:
        raise ConfigError(
            "--max-steps 0 (no step limit) needs --time-budget SECONDS to end the run; give "
            "one of them"
        )
    check_chrono(cfg.chrono_init, name=flag_name("chrono_init"))
    if cfg.cell == "rnn" and (cfg.chrono_init or cfg.checkpoint):
        raise ConfigError("--chrono-init and --checkpoint are LSTM options; --cell rnn has neither")
    if (cfg.curriculum or cfg.answers) and cfg.batching != "documents":
        raise ConfigError(
            "--curriculum and --answers act on windows of whole documents; add --batching documents"
        )
    if cfg.ema and cfg.optimizer == "ntasgd":
        raise ConfigError(
            f"--ema {cfg.ema} and --optimizer ntasgd both average the weights; use --ema with "
            "adamw or sgd, or ntasgd alone"
        )
    if cfg.variable_bptt and cfg.batching != "stream":
        raise ConfigError(
            f"--variable-bptt draws window lengths along the contiguous text stream; it needs "
            f"--batching stream (got --batching {cfg.batching}), or leave --variable-bptt off"
        )
    if cfg.variable_bptt and cfg.seq_len < 2 * MIN_BPTT:
        raise ConfigError(
            f"--variable-bptt draws windows of at least {MIN_BPTT} tokens around --seq-len and "
            f"half of it; it needs --seq-len >= {2 * MIN_BPTT} (got {cfg.seq_len})"
        )
    if cfg.answers:
        try:
            re.compile(cfg.answers)
        except re.error as e:
            raise ConfigError(
                f"--answers is not a regular expression ({e}); fix the pattern"
            ) from None
    if cfg.cell == "rnn":
        from glasslstm.config import FAMILY  # (config imports this module)

        family = [name for name in FAMILY if getattr(cfg, name)]
        if family:
            flags = ", ".join("--" + name.replace("_", "-") for name in family)
            raise ConfigError(f"{flags}: options of the LSTM; --cell rnn has none of them")
    if cfg.tie_weights and cfg.embed not in (0, cfg.hidden):
        raise ConfigError(
            f"--tie-weights needs the embedding as wide as the LSTM's output: --embed 0 or "
            f"--embed {cfg.hidden} (--hidden); got --embed {cfg.embed}"
        )


def check_args(args, rules: Mapping[str, Rule]) -> None:
    """Check a command's parsed arguments (an argparse Namespace) against ``rules``."""
    check(vars(args), rules)


# ------------------------------------------------------------------------ devices


def resolve_device(name, *, flag: str = "--device") -> torch.device:
    """``auto`` (CUDA if present, else the CPU), or the named device once it is known to be
    there; a ConfigError naming the fix otherwise."""
    import torch

    if isinstance(name, torch.device):
        dev = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif not _parses_as_device(name):
        raise InvalidValue("device", name, DEVICE.expected(), name=flag)
    else:
        dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "none found"
            raise ConfigError(
                f"{flag}={name!s} but this machine has no CUDA device ({why}); "
                "use --device cpu (or auto)"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"{flag}={name!s} but this machine has {count} CUDA device"
                f"{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag}={name!s} but MPS is not available here; use --device cpu")
    return dev


# ------------------------------------------------------------------------ paths


def resolve_data(spec: str | None) -> str | None:
    """``--data`` as stored in a run: an existing file or folder as an absolute path (so the
    run keeps working from any directory); a corpus name, or a path that does not exist
    (loading it says so), as given."""
    if spec is None or spec in NAMED_CORPORA:
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def resolve_file(path: str | None) -> str | None:
    """A file option (``--train``, ``--valid``, ``--test``) as an absolute path where it exists
    (one that does not is kept as given: loading it says so)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def resolve_dir(path: str | None) -> str | None:
    """A folder option (``--data-dir``, ``--out``) as an absolute path."""
    return None if path is None else str(Path(path).expanduser().resolve())


def resolve_paths(values: Mapping) -> dict:
    """``values`` (training options) with ``data``, the split files, ``data_dir`` and ``out``,
    where present, made absolute: a run records where its files are, not where it was
    started from."""
    out = dict(values)
    resolvers = {"data": resolve_data, "data_dir": resolve_dir, "out": resolve_dir}
    resolvers.update(dict.fromkeys(("train", "valid", "test"), resolve_file))
    for key, resolve in resolvers.items():
        if isinstance(out.get(key), str):
            out[key] = resolve(out[key])
    return out


# ------------------------------------------------------------------------ memory

FLOAT32 = 4  # bytes


def parameter_shapes(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    *,
    embed_size: int = 0,
    proj_size: int = 0,
    layer_norm: bool = False,
    peephole: bool = False,
    cell: str = "lstm",
) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a LanguageModel's state_dict, without building one:
    embedding, each layer's U, W, biases (and projection; layer normalisation's gains and
    cell bias, peephole weights), the output layer. ``cell``: the recurrent core, the LSTM
    (four gates' rows) or the vanilla RNN (one)."""
    out = proj_size or hidden_size
    embed = embed_size or out
    rows = (4 if cell == "lstm" else 1) * hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (vocab_size, embed)}
    for k in range(num_layers):
        shapes[f"lstm.weight_ih_l{k}"] = (rows, embed if k == 0 else out)
        shapes[f"lstm.weight_hh_l{k}"] = (rows, out)
        shapes[f"lstm.bias_ih_l{k}"] = (rows,)
        shapes[f"lstm.bias_hh_l{k}"] = (rows,)
        if proj_size:
            shapes[f"lstm.weight_hr_l{k}"] = (proj_size, hidden_size)
    for k in range(num_layers):  # glasslstm.LSTM registers the family's after torch's
        if layer_norm:
            shapes[f"lstm.ln_weight_ih_l{k}"] = (4 * hidden_size,)
            shapes[f"lstm.ln_weight_hh_l{k}"] = (4 * hidden_size,)
            shapes[f"lstm.ln_weight_c_l{k}"] = (hidden_size,)
            shapes[f"lstm.ln_bias_c_l{k}"] = (hidden_size,)
        if peephole:
            shapes[f"lstm.weight_ch_l{k}"] = (3 * hidden_size,)
    shapes["head.weight"] = (vocab_size, out)
    shapes["head.bias"] = (vocab_size,)
    return shapes


def count_parameters(shapes: Mapping[str, tuple[int, ...]], *, tie_weights: bool = False) -> int:
    """Parameters in ``shapes`` (the output weight once when tied to the embedding)."""
    return sum(math.prod(s) for k, s in shapes.items() if not (tie_weights and k == "head.weight"))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs: ``state`` (parameters, and in training their gradients and the
    optimizer's moments) and ``activations`` (what one batch keeps for the backward pass)."""

    parameters: int
    state: int
    activations: int
    what: str  # e.g. "parameters, gradients and AdamW state"

    @property
    def total(self) -> int:
        return self.state + self.activations

    def describe(self) -> str:
        text = f"{self.parameters:,} parameters; {self.what}: {format_bytes(self.state)}"
        if self.activations:
            text += f"; activations: {format_bytes(self.activations)}"
        return text


def training_memory(cfg, vocab_size: int) -> MemoryEstimate:
    """What training ``cfg`` (a TrainConfig) on a vocabulary of ``vocab_size`` needs, about;
    on the low side, so that only a run that cannot fit is refused.

    State: float32 parameters, gradients and the optimizer's moments (AdamW two, SGD with
    momentum one). Activations, per token of a batch (``batch_size x seq_len``): each layer's
    input and output (2 H floats) and, kept for the backward pass, its gate pre-activations,
    gates, C_t and tanh(C_t) (10 H; with ``checkpoint=S`` only for one segment of S steps,
    plus each segment's initial state); the embedding's output and gradient; and the logits,
    their softmax and its gradient (3 V floats). Peak memory measured on the CPU was 1.05 to
    2.3 times this figure (H 256-1024, checkpointing on and off): the allocator's caches and
    the backward pass's temporaries come on top.
    """
    shapes = parameter_shapes(
        vocab_size,
        cfg.hidden,
        cfg.layers,
        embed_size=cfg.embed,
        layer_norm=cfg.layer_norm,
        peephole=cfg.peephole,
        cell=cfg.cell,
    )
    params = count_parameters(shapes, tie_weights=cfg.tie_weights)
    if cfg.optimizer == "ntasgd":  # plain SGD, and the average of the weights once it starts
        moments, state_what = 1, "the weights' average"
    elif cfg.optimizer == "adamw":
        moments, state_what = 2, "AdamW state"
    else:
        moments = 1 if cfg.momentum else 0
        state_what = "SGD momentum" if moments else "nothing else"
    what = "parameters, gradients and " + state_what
    if cfg.ema:  # one more copy of the weights
        moments += 1
        kept = "" if state_what == "nothing else" else f", {state_what}"
        what = f"parameters, gradients{kept} and the weights' moving average"
    T, H = cfg.seq_len, cfg.hidden
    if cfg.checkpoint and cfg.checkpoint < T:
        per_layer = T * 2 * H + cfg.checkpoint * 10 * H + math.ceil(T / cfg.checkpoint) * 2 * H
    else:
        per_layer = T * 12 * H
    embed = cfg.embed or H
    floats = cfg.batch_size * (cfg.layers * per_layer + T * (2 * embed + 3 * vocab_size))
    return MemoryEstimate(params, params * (2 + moments) * FLOAT32, floats * FLOAT32, what)


def check_training_memory(cfg, vocab_size: int | None, device: torch.device) -> None:
    """ConfigError, before anything is built, when training ``cfg`` cannot fit in ``device``'s
    memory. ``vocab_size`` None: not known yet (the smallest the level allows is assumed)."""
    if vocab_size is None:
        vocab_size = 256 if cfg.level == "byte" else 1
    check_memory(
        training_memory(cfg, vocab_size),
        device,
        what="training",
        fix="lower --hidden, --layers, --batch-size or --seq-len (or recompute activations "
        "with --checkpoint S)",
    )


def model_memory(shapes: Mapping[str, tuple[int, ...]], *, tie_weights: bool) -> MemoryEstimate:
    """What holding a model of these tensor shapes needs (float32 parameters)."""
    params = count_parameters(shapes, tie_weights=tie_weights)
    return MemoryEstimate(params, params * FLOAT32, 0, "parameters")


def available_memory(device: torch.device) -> int | None:
    """Bytes that ``device`` can still give: free GPU memory; on the CPU the kernel's
    MemAvailable, or the container's (cgroup) limit less its use where that is lower.
    None where it cannot be told."""
    if device.type == "cuda":
        import torch

        try:
            return torch.cuda.mem_get_info(device)[0]
        except RuntimeError:
            return None
    if device.type != "cpu":
        return None
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),  # v1
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 2**60:
                found.append(int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return max(0, min(found)) if found else None


def check_memory(estimate: MemoryEstimate, device: torch.device, *, what: str, fix: str) -> None:
    """ConfigError when ``estimate`` exceeds what ``device`` has available, with both
    figures in the message; nothing when the device cannot say."""
    have = available_memory(device)
    if have is None or estimate.total <= have:
        return
    where = "this machine" if device.type == "cpu" else f"{device}"
    raise ConfigError(
        f"{what} needs about {format_bytes(estimate.total)} of memory ({estimate.describe()}), "
        f"but {where} has {format_bytes(have)} available; {fix}"
    )

"""The configurations of a model and of a training run, and the names they choose from.

Plain dataclasses with no dependency beyond the standard library and the option rules
(:mod:`glasslstm.options`), so that the command line can describe every option (``--help``)
without importing torch. Each field's comment is its meaning and unit; ``glasslstm train
--help`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from glasslstm import options, stories
from glasslstm.errors import ConfigError

# The names some options choose from, here so that ``--help`` lists them without importing the
# modules (and torch) that implement them.
QUANTITIES = ("i", "f", "g", "o", "c", "h")  # torch's gate order, then the two states
PROBES = ("quote", "line-position", "sentence-boundary", "bracket-depth")  # glasslstm cells
TASKS = ("adding", "copy", "subject")  # the long-term-memory tasks (glasslstm.tasks)
MEMORY_MODELS = ("lstm", "gru", "rnn")  # the recurrent models `bench memory` compares
# How the LSTM's gate biases start: forget bias 1 (Jozefowicz et al. 2015), or the chrono
# initialisation (Tallec & Ollivier 2018) spread over time scales up to the task's length.
INITS = ("forget1", "chrono")
# The regularised LSTM family's members `bench variants` times (glasslstm.bench.variants).
VARIANT_MEMBERS = (
    "layer_norm",
    "peephole",
    "cell_clip",
    "zoneout",
    "recurrent_dropout",
    "weight_dropout",
    "input_output_dropout",
    "all",
)


def config_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass, where an unknown key is an error naming it."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown {what} config keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


# The regularised LSTM family's options: the same names in TrainConfig and ModelConfig.
FAMILY = (
    "layer_norm",
    "peephole",
    "cell_clip",
    "zoneout_c",
    "zoneout_h",
    "recurrent_dropout",
    "input_dropout",
    "output_dropout",
    "weight_dropout",
    "embed_dropout",
)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int = 256  # 2x256 trains in minutes on 2 CPU cores; 2x512 for shakespeare
    num_layers: int = 2  # depth helps char models more than width (Karpathy 2015)
    dropout: float = 0.1  # between layers and before the softmax; 0.2-0.35 for small corpora
    embed_size: int = 0  # 0: the LSTM's output size, which allows tie_weights
    tie_weights: bool = False  # share the embedding with the output layer (Press & Wolf 2017)
    forget_bias: float = 1.0  # start out remembering (Jozefowicz et al. 2015)
    chrono_init: int = 0  # >= 2: forget biases spread over 1..T_max steps (Tallec & Ollivier 2018)
    cell: str = "lstm"  # lstm | rnn: the vanilla RNN the article compares the LSTM with
    proj_size: int = 0  # LSTMP: project H_t to this size (0: none)
    checkpoint: int = 0  # recompute in backward, S steps per segment (0: off); memory only
    # The regularised LSTM family (glasslstm.LSTM's options of the same names; all off: the
    # article's cell). Run directories written before these keys existed load with them off.
    layer_norm: bool = False  # layer normalisation of the gate pre-activations and the cell
    peephole: bool = False  # the gates also see the cell state (Gers & Schmidhuber 2000)
    cell_clip: float = 0.0  # bound on |C_t| (0: no clipping)
    zoneout_c: float = 0.0  # probability a cell unit keeps its previous value (training)
    zoneout_h: float = 0.0  # the same for the hidden state
    recurrent_dropout: float = 0.0  # variational dropout on H_{t-1} fed back, one mask/sequence
    input_dropout: float = 0.0  # variational dropout on the embedded tokens (first layer's input)
    output_dropout: float = 0.0  # variational dropout on every layer's output
    weight_dropout: float = 0.0  # DropConnect on every weight_hh, one mask per forward pass
    embed_dropout: float = 0.0  # drop whole tokens' embeddings (every occurrence in a batch)

    def __post_init__(self):
        options.check_fields(self, options.MODEL, name=lambda key: f"ModelConfig.{key}")
        options.check_chrono(self.chrono_init, name="ModelConfig.chrono_init")
        if self.cell == "rnn" and (self.proj_size or self.checkpoint or self.chrono_init):
            raise ConfigError(
                "proj_size, checkpoint and chrono_init are LSTM options; the rnn cell has none"
            )
        if self.cell == "rnn" and any(getattr(self, name) for name in FAMILY):
            raise ConfigError(
                f"the regularised family ({', '.join(FAMILY)}) is the LSTM's; the rnn cell has "
                "none of it"
            )
        if self.proj_size and self.proj_size >= self.hidden_size:
            raise ConfigError(
                f"proj_size={self.proj_size} must be smaller than hidden_size={self.hidden_size}"
            )
        if self.tie_weights and self.embed_size not in (0, self.out_size):
            raise ConfigError(
                f"tie_weights needs embed_size == the LSTM's output size ({self.out_size}); "
                f"got embed_size={self.embed_size} (use 0 to match automatically)"
            )

    @property
    def out_size(self) -> int:
        return self.proj_size or self.hidden_size

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return config_from_dict(cls, d, "model")


# A good run of each level on a 2-core machine in a few minutes to an hour: the value of
# every TrainConfig field left at BY_LEVEL. Char and byte: 2x256 reaches a good stories model
# in minutes; AdamW at 2e-3 is the sweet spot for char LSTMs of this size. Word (PTB /
# WikiText-style text): the output layer tied to the embedding (Press & Wolf 2017; half the
# parameters of a large vocabulary) and strong dropout, as small word corpora overfit within
# a few passes; windows of 35 words, as in the literature.
LEVEL_DEFAULTS: dict[str, dict[str, object]] = {
    "char": {
        "hidden": 256,
        "dropout": 0.1,
        "tie_weights": False,
        "seq_len": 128,
        "batch_size": 32,
        "lr": 2e-3,
        "max_steps": 600,
    },
    "word": {
        "hidden": 256,
        "dropout": 0.5,
        "tie_weights": True,
        "seq_len": 35,
        "batch_size": 32,
        "lr": 3e-3,
        "max_steps": 1000,
    },
}
LEVEL_DEFAULTS["byte"] = dict(LEVEL_DEFAULTS["char"])
# The default of the fields above: TrainConfig replaces it with the level's value.
BY_LEVEL: Any = None


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the data, the model, the optimisation, where it is written.
    Each field is an option of ``glasslstm train`` (``hidden`` is ``--hidden``); what each
    means is in :data:`TRAIN_HELP`. Values are checked on construction
    (:data:`glasslstm.options.TRAIN`)."""

    data: str | None = None
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    data_dir: str | None = None
    level: str = "char"
    min_freq: int = 2
    hidden: int = BY_LEVEL
    layers: int = 2
    dropout: float = BY_LEVEL
    embed: int = 0
    tie_weights: bool = BY_LEVEL
    forget_bias: float = 1.0
    chrono_init: int = 0
    cell: str = "lstm"
    seq_len: int = BY_LEVEL
    batching: str = "stream"
    curriculum: int = 0
    answers: str = ""
    answer_weight: float = 1.0
    batch_size: int = BY_LEVEL
    optimizer: str = "adamw"
    lr: float = BY_LEVEL
    weight_decay: float = 0.01
    momentum: float = 0.9
    nonmono: int = 5
    ema: float = 0.0
    variable_bptt: bool = False
    ar: float = 0.0
    tar: float = 0.0
    schedule: str = "cosine"
    warmup: int = 50
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    max_steps: int = BY_LEVEL
    time_budget: float = 0.0
    eval_every: int = 100
    eval_batches: int = 0
    patience: int = 0
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"
    threads: int = 0
    checkpoint: int = 0
    layer_norm: bool = False
    peephole: bool = False
    cell_clip: float = 0.0
    zoneout_c: float = 0.0
    zoneout_h: float = 0.0
    recurrent_dropout: float = 0.0
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    weight_dropout: float = 0.0
    embed_dropout: float = 0.0
    deterministic: bool = False
    precision: str = "fp32"
    out: str | None = None

    # Keys that may change when a run is resumed; everything else defines the run.
    RESUMABLE = (
        "max_steps",
        "time_budget",
        "eval_every",
        "eval_batches",
        "patience",
        "log_every",
        "device",
        "threads",
        "checkpoint",
        "deterministic",
        "precision",
        "data",  # the same text at a new place: checked against the run's SHA-256
        "train",
        "valid",
        "test",
        "data_dir",
    )

    def __post_init__(self):
        # BY_LEVEL: the level's default (max_steps: no limit when there is a time budget;
        # a time budget that is not a number is refused by the check below)
        defaults = dict(LEVEL_DEFAULTS.get(self.level, {}))
        if self.optimizer == "ntasgd" and self.lr is None and self.level in LEVEL_DEFAULTS:
            raise ConfigError(
                f"--optimizer ntasgd is plain SGD and needs a learning rate for SGD; the "
                f"{self.level} level's default, --lr {defaults['lr']}, is AdamW's and would "
                "barely move the weights. Give --lr (AWD-LSTM: --lr 30 --clip 0.25)"
            )
        if self.time_budget:
            defaults["max_steps"] = 0
        for key, value in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        options.check_train(self)  # types and ranges: glasslstm.options.TRAIN

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            num_layers=self.layers,
            dropout=self.dropout,
            embed_size=self.embed,
            tie_weights=self.tie_weights,
            forget_bias=self.forget_bias,
            checkpoint=self.checkpoint,
            chrono_init=self.chrono_init,
            cell=self.cell,
            **{name: getattr(self, name) for name in FAMILY},
        )

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return config_from_dict(cls, d, "train")


# How `glasslstm train` trains on the built-in stories (everything else: TrainConfig's):
# the article's examples learned in the first run (why each value: docs/article.md).
STORIES_RECIPE: dict[str, object] = {
    "level": "word",  # a name is one token: the blank is one prediction, distances in words
    "hidden": 128,  # 1 x 128 with tied embeddings: ~175,000 parameters, ~2 minutes on 2 cores
    "layers": 1,
    "dropout": 0.0,  # generated text, a few passes: nothing to overfit
    "tie_weights": True,  # the output layer is the embedding: recalling a name = keeping it
    "chrono_init": 64,  # memories of 1..64 tokens from the start (a story: 20-250 tokens)
    "batching": "documents",  # every window starts at a story, from the zero state
    "curriculum": 400,  # short stories first: the recall is found where it is cheap
    "answers": stories.ANSWERS,  # the blank's name and the pronoun after a subject switch
    "answer_weight": 50.0,  # ... count 50 times in the loss
    "seq_len": 256,  # a whole story, and the start of the next
    "batch_size": 16,
    "lr": 3e-3,
    "warmup": 30,
    "max_steps": 700,
    "eval_every": 100,
}

# What each training option means and its unit, as `glasslstm train --help` prints it (followed
# by the default). Every TrainConfig field has an entry (a test checks).
TRAIN_HELP: dict[str, str] = {
    "data": (
        "the text: a UTF-8 file, a named corpus (stories, shakespeare), or a folder (with "
        "train/valid/test files such as train.txt or wiki.train.tokens: used as the splits); "
        "by default the built-in stories corpus (generated, no download)"
    ),
    "train": "the training split's file (instead of --data)",
    "valid": "the validation split's file (by default the last 10% of --train)",
    "test": "the test split's file: the best model is scored on it at the end",
    "data_dir": "a folder where named corpora are looked for first (by default the cache folder)",
    "level": "what one token is: a character, a word, or a byte of UTF-8",
    "min_freq": "word level: words seen fewer times than this in training become <unk>",
    "hidden": "hidden units (cells) per LSTM layer",
    "layers": "stacked LSTM layers",
    "dropout": (
        "probability of zeroing an activation between layers and before the output layer (0: off)"
    ),
    "embed": "size of the token embedding (0: the LSTM's output size, which --tie-weights needs)",
    "tie_weights": "use the embedding matrix as the output layer's weights too",
    "forget_bias": (
        "initial bias of the forget gate (1: start out remembering, Jozefowicz et al. 2015)"
    ),
    "seq_len": (
        "tokens per truncated-BPTT window (the state still flows from one window to the next)"
    ),
    "chrono_init": (
        "the chrono initialisation (Tallec & Ollivier 2018): forget-gate time scales spread "
        "over 1..N tokens, for dependencies up to N tokens long (0: off; sets the biases "
        "instead of --forget-bias)"
    ),
    "cell": "the recurrent cell: lstm, or rnn (a vanilla RNN, to compare with)",
    "batching": (
        "stream: the text cut into --batch-size rows read in order, state carried; random: "
        "independent windows; documents: windows of whole documents (paragraphs), each "
        "starting from a zero state"
    ),
    "curriculum": (
        "documents batching: the first N steps train on the shortest quarter of the "
        "documents, in windows half as long (0: off)"
    ),
    "answers": (
        "documents batching: a regular expression over the text; the tokens of its last group "
        "are answers, weighted by --answer-weight in the loss (empty: none)"
    ),
    "answer_weight": "how many times the loss on an answer token counts (1: like any token)",
    "batch_size": "sequences (rows) trained in parallel per step",
    "optimizer": (
        "the optimizer: AdamW (decoupled weight decay), SGD with momentum, or ntasgd: plain SGD "
        "with weight decay that switches to averaged SGD when validation stops improving "
        "(Merity et al. 2017; see --nonmono). ntasgd needs --lr, an SGD learning rate (AWD-LSTM: "
        "--lr 30 --weight-decay 1.2e-6 --clip 0.25)"
    ),
    "lr": "peak learning rate (after warm-up)",
    "weight_decay": "weight decay per step, relative to the learning rate (0: off)",
    "momentum": "SGD's momentum (ignored by AdamW and ntasgd)",
    "nonmono": (
        "ntasgd: averaging starts at the first validation whose loss is worse than the best "
        "loss of the validations before the last N (evaluations; ignored by other optimizers)"
    ),
    "ema": (
        "keep an exponential moving average of the weights, keeping this fraction of the "
        "average at each step (0.999: about the last 1,000 steps; fewer in the first steps); "
        "validation, best/, the saved model and the test score use the average (0: off; not "
        "with ntasgd, which averages by itself)"
    ),
    "variable_bptt": (
        "stream batching: each step's window is N(--seq-len, 5) tokens long (N(--seq-len / 2, "
        "5) with probability 0.05), at least 5 and at most 2 x --seq-len, and that step's "
        "learning rate is scaled by its length / --seq-len (Merity et al. 2017)"
    ),
    "ar": (
        "activation regularisation: adds this times the mean square of the top LSTM layer's "
        "output after dropout to the training loss (nats per token; 0: off)"
    ),
    "tar": (
        "temporal activation regularisation: adds this times the mean square of the change of "
        "the top LSTM layer's output (before the output layer's dropout) from one step to the "
        "next to the training loss (nats per token; 0: off)"
    ),
    "schedule": (
        "learning rate over time: cosine decay to --min-lr-ratio x --lr at --max-steps, or constant"
    ),
    "warmup": "steps of linear learning-rate warm-up from 0",
    "min_lr_ratio": "where the cosine schedule ends, as a fraction of --lr",
    "clip": "largest gradient norm; larger gradients are scaled down to it (0: off)",
    "max_steps": "optimizer steps to train for (0: no limit, with --time-budget)",
    "time_budget": "seconds of training after which the run stops and saves (0: no limit)",
    "eval_every": "steps between validations (each also saves a checkpoint)",
    "eval_batches": "validation batches per evaluation (0: the whole validation split)",
    "patience": "stop after this many validations without a new best (0: never)",
    "log_every": "steps between training-loss rows in metrics.jsonl",
    "seed": "seed of the initial weights, dropout, batch order and the final sample",
    "device": "where to train: auto (a GPU if there is one), cpu, cuda, cuda:N or mps",
    "threads": "CPU threads torch uses (0: torch's default, one per core)",
    "checkpoint": (
        "recompute activations in backward, this many time steps per segment: less memory, more"
        " time (0: off)"
    ),
    "layer_norm": (
        "layer normalisation (Ba et al. 2016) of the input and recurrent products before the "
        "gates and of the cell state before its tanh, with a learned gain (and cell bias) each"
    ),
    "peephole": (
        "peephole connections (Gers & Schmidhuber 2000): the input and forget gates also see "
        "C_{t-1}, the output gate C_t, through a learned weight per unit"
    ),
    "cell_clip": "clip the cell state C_t to [-v, v] at every step (0: no clipping)",
    "zoneout_c": (
        "zoneout (Krueger et al. 2016): probability that a unit of the cell state keeps its "
        "previous value at a training step (0: off)"
    ),
    "zoneout_h": "zoneout of the hidden state H_t: the same probability for H_t (0: off)",
    "recurrent_dropout": (
        "variational dropout (Gal & Ghahramani 2016) on the hidden state fed back to the next "
        "step: probability of zeroing a unit, one mask per sequence for all its steps (0: off)"
    ),
    "input_dropout": (
        "variational dropout on the embedded tokens entering the first LSTM layer: probability "
        "of zeroing a feature, one mask per sequence for all its steps (0: off)"
    ),
    "output_dropout": (
        "variational dropout on every LSTM layer's output (the last one's before the output "
        "layer): probability of zeroing a unit, one mask per sequence (0: off)"
    ),
    "weight_dropout": (
        "DropConnect on the recurrent weights W_hh (the weight drop of Merity et al. 2017): "
        "probability of zeroing a weight, one mask per training step (0: off)"
    ),
    "embed_dropout": (
        "embedding dropout (Gal & Ghahramani 2016): probability of dropping a token type's "
        "whole embedding, at all its occurrences in a training batch (0: off)"
    ),
    "deterministic": "bitwise repeatable runs (on the same machine with the same --threads)",
    "precision": (
        "fp32, or bf16: matrix products in bfloat16 where the hardware has them, state and loss"
        " in float32"
    ),
    "out": "the run directory to write (by default runs/<corpus>-<date>-<time>)",
}

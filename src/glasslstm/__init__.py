"""glasslstm: the LSTM from first principles, drop-in compatible with torch.nn.LSTM, gates visible.

    glasslstm.LSTM            the engine: a drop-in torch.nn.LSTM; return_gates=True for a GateTrace
    glasslstm.GRU, .RNN       the comparison models, drop-in for torch.nn.GRU / torch.nn.RNN
    glasslstm.Stream          one token at a time, state kept, no allocation per step
    glasslstm.LanguageModel   Embedding -> LSTM -> Linear; .load(), .generate(), .predict_next()
    glasslstm.train(config)   train a language model into a run directory (TrainConfig)
    glasslstm.reference       the article's equations in NumPy with a hand-written BPTT
    glasslstm.deterministic() bitwise identical runs (also set_deterministic(True), --deterministic)

Importing the package has no side effects: no global configuration, no threads, no I/O.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public names, imported on first use (PEP 562): `import glasslstm` and the command line's
# argument parsing (`glasslstm --help`) do not pay for importing torch.
_LAZY = {
    "LSTM": "glasslstm.lstm",
    "GRU": "glasslstm.rnn",
    "RNN": "glasslstm.rnn",
    "GateTrace": "glasslstm.trace",
    "Stream": "glasslstm.stream",
    "LMStream": "glasslstm.stream",
    "LanguageModel": "glasslstm.model",
    "ModelConfig": "glasslstm.model",
    "TrainConfig": "glasslstm.trainer",
    "TrainResult": "glasslstm.trainer",
    "train": "glasslstm.trainer",
    "deterministic": "glasslstm.determinism",
    "set_deterministic": "glasslstm.determinism",
}

if TYPE_CHECKING:
    from glasslstm.determinism import deterministic, set_deterministic
    from glasslstm.lstm import LSTM
    from glasslstm.model import LanguageModel, ModelConfig
    from glasslstm.rnn import GRU, RNN
    from glasslstm.stream import LMStream, Stream
    from glasslstm.trace import GateTrace
    from glasslstm.trainer import TrainConfig, TrainResult, train


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'glasslstm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "GateTrace",
    "Stream",
    "LMStream",
    "LanguageModel",
    "ModelConfig",
    "TrainConfig",
    "TrainResult",
    "train",
    "deterministic",
    "set_deterministic",
    "__version__",
]

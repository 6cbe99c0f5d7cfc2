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

__version__ = "0.1.0"

from glasslstm.determinism import deterministic, set_deterministic  # noqa: E402
from glasslstm.lstm import LSTM  # noqa: E402  (after __version__, which trainer records)
from glasslstm.model import LanguageModel, ModelConfig  # noqa: E402
from glasslstm.rnn import GRU, RNN  # noqa: E402
from glasslstm.stream import LMStream, Stream  # noqa: E402
from glasslstm.trace import GateTrace  # noqa: E402
from glasslstm.trainer import TrainConfig, TrainResult, train  # noqa: E402

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

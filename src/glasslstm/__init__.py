"""glasslstm: the LSTM from first principles, drop-in compatible with torch.nn.LSTM, gates visible.

Importing the package has no side effects: no global configuration, no threads, no I/O.
"""

from glasslstm.lstm import LSTM
from glasslstm.trace import GateTrace

__version__ = "0.1.0"
__all__ = ["LSTM", "GateTrace", "__version__"]

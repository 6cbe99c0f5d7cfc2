"""The comparison models: a vanilla RNN and a GRU, drop-in for torch.nn.RNN / torch.nn.GRU.

They share everything but the cell with :class:`glasslstm.LSTM` (signature, weights,
``lengths=``, packing, ``return_gates``), so the long-term-memory benchmarks train all three
with the same code. The article's claim is about the first: a plain RNN,
``h_t = tanh(x_t W_ih^T + h_{t-1} W_hh^T + b)``, loses long-term dependencies to the
vanishing gradient. Both run on the plain autograd loop (:mod:`glasslstm.ops.loop`).
"""

from __future__ import annotations

import torch
from torch import nn

from glasslstm.ops.loop import gru_layer_loop, rnn_layer_loop
from glasslstm.recurrent import Lengths, Recurrent


class _SingleState(Recurrent):
    """A recurrent layer whose state is h alone: ``forward -> (output, h_n)``."""

    state_names = ("h_0",)

    def forward(
        self,
        input,
        hx: torch.Tensor | None = None,
        *,
        lengths: Lengths = None,
        return_gates: bool = False,
    ):
        """Like torch's: ``(output, h_n)``; with ``return_gates``, ``(output, h_n, trace)``.

        ``hx`` is ``h_0`` (num_layers * num_directions, B, hidden_size); ``lengths`` and
        ``return_gates`` as for :meth:`glasslstm.LSTM.forward`.
        """
        output, (h_n,), trace = self._run(input, hx, lengths, return_gates)
        return (output, h_n, trace) if return_gates else (output, h_n)


class GRU(_SingleState):
    """torch.nn.GRU's cell: r = σ(.), z = σ(.), n = tanh(x W_in + r ⊙ (h W_hn + b_hn)),
    h' = (1 - z) ⊙ n + z ⊙ h. Traces record ``r``, ``z``, ``n`` and ``h``."""

    mode = "GRU"
    gates = 3
    trace_fields = ("r", "z", "n", "h")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        proj_size: int = 0,  # accepted to be refused like torch's: a projection is LSTM's only
        backend: str | None = None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
            backend=backend,
        )

    @classmethod
    def _torch_class(cls) -> type[nn.Module]:
        return nn.GRU

    def _layer(self, backend, x, state, weights, batch_sizes, reverse, record, layer=0):
        w_ih, w_hh, b_ih, b_hh, _ = weights
        y, h_n, rec = gru_layer_loop(
            x, state[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, record
        )
        if record:
            rec = {**rec, "h": y.detach()}
        return y, (h_n,), rec


class RNN(_SingleState):
    """The vanilla (Elman) RNN of torch.nn.RNN: ``h' = tanh(x W_ih^T + h W_hh^T + b)``
    (``nonlinearity="relu"`` for ReLU). Traces record ``h``."""

    mode = "RNN_TANH"
    gates = 1
    trace_fields = ("h",)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        proj_size: int = 0,  # accepted to be refused like torch's: a projection is LSTM's only
        backend: str | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity={nonlinearity!r}; use 'tanh' or 'relu'")
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
            backend=backend,
        )

    @classmethod
    def _torch_class(cls) -> type[nn.Module]:
        return nn.RNN

    @classmethod
    def _torch_only_kwargs(cls) -> tuple[str, ...]:
        return ("nonlinearity",)

    def _repr_options(self) -> dict:
        return {**super()._repr_options(), "nonlinearity": "tanh"}

    def _layer(self, backend, x, state, weights, batch_sizes, reverse, record, layer=0):
        w_ih, w_hh, b_ih, b_hh, _ = weights
        y, h_n, _ = rnn_layer_loop(
            x, state[0], w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, record, self.nonlinearity
        )
        return y, (h_n,), ({"h": y.detach()} if record else None)

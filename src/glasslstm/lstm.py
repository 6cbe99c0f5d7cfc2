"""glasslstm.LSTM: the article's LSTM as a drop-in replacement for ``torch.nn.LSTM``.

The cell, in the article's notation (rows of torch's weights in gate order i, f, g, o)::

    f_t = σ(x_t U_f + H_{t-1} W_f + b_f)      forget gate              trace.f
    i_t = σ(x_t U_i + H_{t-1} W_i + b_i)      input gate               trace.i
    N_t = tanh(x_t U_c + H_{t-1} W_c + b_c)   new information          trace.g
    C_t = f_t ⊙ C_{t-1} + i_t ⊙ N_t            cell state (long-term)   trace.c
    o_t = σ(x_t U_o + H_{t-1} W_o + b_o)      output gate              trace.o
    H_t = o_t ⊙ tanh(C_t)                       hidden state (short-term) trace.h

``U`` is ``weight_ih_l{k}`` (transposed), ``W`` is ``weight_hh_l{k}``, ``b`` is
``bias_ih_l{k} + bias_hh_l{k}``; with ``proj_size > 0``, ``H_t`` is further multiplied by
``weight_hr_l{k}`` (LSTMP). Parameter names, shapes and initialisation are torch.nn.LSTM's,
so a ``state_dict`` moves between the two unchanged, and the same seed gives the same weights.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from glasslstm.ops import lstm_layer
from glasslstm.ops.recompute import checkpointed
from glasslstm.ops.step import drop_in_step
from glasslstm.recurrent import Lengths, Recurrent, _check_int


class LSTM(Recurrent):
    """Multi-layer LSTM with torch.nn.LSTM's signature, weights and results, gates on request.

    Args (torch.nn.LSTM's): ``input_size``, ``hidden_size``, ``num_layers=1``, ``bias=True``,
    ``batch_first=False``, ``dropout=0.0`` (on the outputs of every layer but the last, in
    training mode), ``bidirectional=False``, ``proj_size=0``, ``device``, ``dtype``.

    Keyword-only:
        forget_bias: added to the forget-gate slice of every ``bias_ih`` after torch's uniform
            init. ``0.0`` (default) reproduces torch's init exactly; ``1.0`` is the common
            choice after Jozefowicz et al. (2015): the cell starts out remembering.
        chrono_init: ``0`` (default): off. ``T_max > 1``: the chrono initialisation of Tallec &
            Ollivier (2018, "Can recurrent neural networks warp time?"): each unit's forget
            bias is ``log(u)``, ``u`` drawn uniformly from ``[1, T_max - 1]``, and its input
            bias the negative of that (both in ``bias_ih``; ``bias_hh``'s i and f slices are
            zeroed). Unit ``j`` then starts out remembering over about ``u_j`` steps, a
            spread of time scales up to ``T_max`` — set it to the longest dependency the data
            has. Replaces ``forget_bias`` (give one or the other). Draws from torch's global
            RNG after the uniform init, so a seed still fixes the weights.
        backend: ``"auto"`` (default: ``"fused"`` where it can run, else ``"bptt"``),
            ``"fused"`` (hand-derived backward, gate math in one fused kernel: C on the CPU,
            Triton on CUDA), ``"bptt"`` (the same in torch ops) or ``"loop"`` (plain autograd
            loop). None reads ``$GLASSLSTM_BACKEND``. See :mod:`glasslstm.ops`.
        checkpoint: activation checkpointing through time, for training on long sequences.
            ``0`` (default): off. ``S > 0``: every layer and direction runs in segments of
            ``S`` steps; forward keeps only each segment's initial ``(h, c)`` (besides the
            input and output, which autograd needs anyway) and backward recomputes one segment
            at a time. Training memory then grows as O(T/S + S) per layer instead of O(T)
            activations (gates, cell states, tanh(C)) — a T = 10,000 sequence fits — at the cost
            of one more forward pass per step. Gradients equal those without checkpointing up
            to rounding; results, ``return_gates``, ``lengths`` and every backend are
            unchanged. It acts only when gradients are on and the sequence is longer than
            ``S``; ``S`` near ``sqrt(T)`` minimises memory. (Not to be confused with the run
            directory "checkpoints" of :mod:`glasslstm.rundir`.)
    """

    quantized: str | None = None  # "int8" once glasslstm.quantize.int8 rounded the weights

    mode = "LSTM"
    gates = 4
    state_names = ("h_0", "c_0")
    trace_fields = ("i", "f", "g", "o", "c", "h")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        forget_bias: float = 0.0,
        backend: str | None = None,
        checkpoint: int = 0,
        chrono_init: int = 0,
    ) -> None:
        _check_int("checkpoint", checkpoint, minimum=0)
        _check_int("chrono_init", chrono_init, minimum=0)
        given: object = forget_bias  # checked as anything a caller may pass
        if isinstance(given, bool) or not isinstance(given, numbers.Real):
            raise TypeError(f"forget_bias must be a number; got {type(given).__name__}")
        if not math.isfinite(given):
            raise ValueError(f"forget_bias must be finite (else every output is NaN); got {given}")
        if chrono_init == 1:
            raise ValueError(
                "chrono_init=1 gives no time scale to spread; use 0 (off) or the "
                "longest dependency length T_max >= 2"
            )
        if chrono_init and forget_bias:
            raise ValueError(
                "give forget_bias or chrono_init, not both: chrono_init sets the "
                "forget biases itself"
            )
        if chrono_init and not bias:
            raise ValueError("chrono_init sets biases; it needs bias=True")
        self.forget_bias = float(forget_bias)  # read by reset_parameters, called below
        self.chrono_init = chrono_init
        self.checkpoint = checkpoint
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
        # The drop-in step keeps its own copies of the weights, refreshed when a Parameter
        # changes; it runs only while every weight is still a registered Parameter (not a tensor
        # that weight_norm, pruning or parametrize recompute at every call).
        self._weight_names = frozenset(self._flat_weights_names)

    def reset_parameters(self) -> None:
        """torch.nn.LSTM's init (uniform ±1/sqrt(hidden_size)), plus ``forget_bias`` or
        ``chrono_init``."""
        super().reset_parameters()
        if not self.bias or not (self.forget_bias or self.chrono_init):
            return
        H = self.hidden_size
        with torch.no_grad():
            for layer in range(self.num_layers):
                for direction in range(self.num_directions):
                    _, _, b_ih, b_hh = self._weights(layer, direction)[:4]
                    if self.chrono_init:
                        u = torch.empty(H, dtype=torch.float64).uniform_(1, self.chrono_init - 1)
                        b_f = u.log().to(b_ih.dtype)
                        b_ih[H : 2 * H] = b_f
                        b_ih[:H] = -b_f
                        b_hh[: 2 * H] = 0
                    else:
                        b_ih[H : 2 * H] += self.forget_bias

    @classmethod
    def _torch_class(cls) -> type[nn.Module]:
        return nn.LSTM

    @classmethod
    def _torch_only_kwargs(cls) -> tuple[str, ...]:
        return ("proj_size",)

    def _repr_options(self) -> dict:
        return {**super()._repr_options(), "forget_bias": 0.0, "checkpoint": 0, "chrono_init": 0}

    def forward(
        self,
        input,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        lengths: Lengths = None,
        return_gates: bool = False,
    ):
        """Run the LSTM over a sequence, like torch.nn.LSTM.

        Args:
            input: ``(T, B, input_size)`` (``(B, T, input_size)`` when batch_first), an
                unbatched ``(T, input_size)``, or a ``PackedSequence``. Floating point.
            hx: optional ``(h_0, c_0)``: ``(num_layers * num_directions, B, proj_size or
                hidden_size)`` and ``(num_layers * num_directions, B, hidden_size)`` (without
                the B dimension for unbatched input). Zeros when omitted.
            lengths: optional length of each sequence in a padded batch (B ints, 1..T, any
                order). Steps past a sequence's length leave its state unchanged and give zero
                output; ``h_n``/``c_n`` are each sequence's last real step (for the reverse
                direction: its first step, as with packing).
            return_gates: also return a :class:`~glasslstm.trace.GateTrace`.

        Returns:
            ``(output, (h_n, c_n))``, or ``(output, (h_n, c_n), trace)`` with return_gates.
            ``output``: ``(T, B, D * out)`` (``(B, T, ...)`` when batch_first, a
            ``PackedSequence`` for packed input), out = proj_size or hidden_size, D = 2 if
            bidirectional else 1.
        """
        if (
            not return_gates
            and lengths is None
            and not torch.is_grad_enabled()
            and self._weight_names.issubset(self._parameters)
        ):
            fast = drop_in_step(self, input, hx)  # one token of one sequence: the C++ step
            if fast is not None:
                return fast
        output, states, trace = self._run(input, hx, lengths, return_gates)
        if return_gates:
            return output, states, trace
        return output, states

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("_drop_in") is not None:  # the drop-in call's weight copies: not saved
            state = {**state, "_drop_in": None}
        return state

    def _layer(self, backend, x, state, weights, batch_sizes, reverse, record):
        def run(x, state, weights, batch_sizes, record):
            return lstm_layer(backend, x, state[0], state[1], weights, batch_sizes, reverse, record)

        res = checkpointed(run, self.checkpoint, x, state, weights, batch_sizes, reverse, record)
        y, h_n, c_n = res[:3]
        recorded = None
        if record:
            H = self.hidden_size
            gates = res[3]  # (T, B, 4H): i, f, g, o
            recorded = {
                "i": gates[..., :H],
                "f": gates[..., H : 2 * H],
                "g": gates[..., 2 * H : 3 * H],
                "o": gates[..., 3 * H :],
                "c": res[4],
                "h": y.detach(),
            }
        return y, (h_n, c_n), recorded

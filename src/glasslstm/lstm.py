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
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from glasslstm.ops import lstm_layer, resolve_backend
from glasslstm.trace import FIELDS, GateTrace

_WEIGHT_KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


class LSTM(nn.Module):
    """Multi-layer LSTM with torch.nn.LSTM's signature, weights and results, gates on request.

    Args (torch.nn.LSTM's): ``input_size``, ``hidden_size``, ``num_layers=1``, ``bias=True``,
    ``batch_first=False``, ``dropout=0.0`` (on the outputs of every layer but the last, in
    training mode), ``bidirectional=False``, ``proj_size=0``, ``device``, ``dtype``.

    Keyword-only:
        forget_bias: added to the forget-gate slice of every ``bias_ih`` after torch's uniform
            init. ``0.0`` (default) reproduces torch's init exactly; ``1.0`` is the common
            choice after Jozefowicz et al. (2015): the cell starts out remembering.
        backend: ``"auto"`` (default), ``"bptt"`` (hand-derived backward, fast) or ``"loop"``
            (plain autograd loop). None reads ``$GLASSLSTM_BACKEND``. See :mod:`glasslstm.ops`.
    """

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
    ) -> None:
        super().__init__()
        _check_int("input_size", input_size, minimum=1)
        _check_int("hidden_size", hidden_size, minimum=1)
        _check_int("num_layers", num_layers, minimum=1)
        _check_int("proj_size", proj_size, minimum=0)
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size={proj_size} must be smaller than hidden_size={hidden_size} "
                "(proj_size=0 means no projection)"
            )
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(f"dropout={dropout!r} must be a number in [0, 1]")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} acts between layers, so it has no effect with num_layers=1",
                UserWarning,
                stacklevel=2,
            )
        if backend is not None:
            resolve_backend(backend)  # fail now on a wrong name, not at the first forward
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.forget_bias = float(forget_bias)
        self.backend = backend
        self.mode = "LSTM"

        factory = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        out_size = proj_size or hidden_size
        self._flat_weights_names: list[str] = []
        # Registration order is torch.nn.LSTM's, so that reset_parameters() draws the same
        # numbers from the same seed.
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out_size * num_directions
            for direction in range(num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = {
                    "weight_ih": (4 * hidden_size, layer_in),
                    "weight_hh": (4 * hidden_size, out_size),
                    "bias_ih": (4 * hidden_size,) if bias else None,
                    "bias_hh": (4 * hidden_size,) if bias else None,
                    "weight_hr": (proj_size, hidden_size) if proj_size else None,
                }
                for kind in _WEIGHT_KINDS:
                    if shapes[kind] is not None:
                        name = kind + suffix
                        setattr(self, name, nn.Parameter(torch.empty(shapes[kind], **factory)))
                        self._flat_weights_names.append(name)
        self.reset_parameters()

    # ---------------------------------------------------------------- parameters
    def reset_parameters(self) -> None:
        """torch.nn.LSTM's init (uniform ±1/sqrt(hidden_size)), plus ``forget_bias``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)
        if self.bias and self.forget_bias:
            H = self.hidden_size
            with torch.no_grad():
                for layer in range(self.num_layers):
                    for direction in range(self.num_directions):
                        self._weights(layer, direction)[2][H : 2 * H] += self.forget_bias

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _weights(self, layer: int, direction: int):
        """``(w_ih, w_hh, b_ih, b_hh, w_hr)`` of one layer and direction (None where absent)."""
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        return tuple(getattr(self, kind + suffix, None) for kind in _WEIGHT_KINDS)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer and direction, the parameters in torch.nn.LSTM's order (as torch has it)."""
        return [
            [w for w in self._weights(layer, direction) if w is not None]
            for layer in range(self.num_layers)
            for direction in range(self.num_directions)
        ]

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch.nn.LSTM (our weights need no flat cuDNN buffer)."""

    @classmethod
    def from_torch(cls, lstm: nn.LSTM, **kwargs) -> LSTM:
        """A glasslstm.LSTM with ``lstm``'s configuration, weights, device and dtype."""
        ref = next(lstm.parameters())
        ours = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            bias=lstm.bias,
            batch_first=lstm.batch_first,
            dropout=lstm.dropout,
            bidirectional=lstm.bidirectional,
            proj_size=lstm.proj_size,
            device=ref.device,
            dtype=ref.dtype,
            **kwargs,
        )
        ours.load_state_dict(lstm.state_dict())
        ours.train(lstm.training)
        return ours

    def to_torch(self) -> nn.LSTM:
        """A torch.nn.LSTM with this module's configuration and weights (copies)."""
        ref = next(self.parameters())
        # torch.nn.LSTM is built here only as an export target; it computes nothing of ours.
        theirs = nn.LSTM(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
            device=ref.device,
            dtype=ref.dtype,
        )
        theirs.load_state_dict(self.state_dict())
        theirs.train(self.training)
        return theirs

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (
            ("bias", True),
            ("batch_first", False),
            ("dropout", 0.0),
            ("bidirectional", False),
            ("proj_size", 0),
            ("forget_bias", 0.0),
            ("backend", None),
        ):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)!r}"
        return s

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        lengths: torch.Tensor | Sequence[int] | None = None,
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
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError(
                    "lengths= cannot be combined with a PackedSequence input, which carries its "
                    "own lengths; pass one or the other"
                )
            self._check_input(input.data.unsqueeze(0))  # dtype, device, feature size
            x, batch_sizes, flat_index = _unpack(input)
            sort, unsort = input.sorted_indices, input.unsorted_indices
            unbatched = False
        else:
            x, unbatched = self._check_input(input)
            if unbatched and lengths is not None:
                raise ValueError(
                    "lengths= needs a batched input (T, B, input_size); got an unbatched "
                    f"input of shape {tuple(input.shape)}"
                )
            if self.batch_first and not unbatched:
                x = x.transpose(0, 1)
            batch_sizes, sort, unsort, x = self._sort_by_length(x, lengths)
        T, B = x.shape[0], x.shape[1]
        h0, c0 = self._initial_state(hx, B, x, unbatched)
        if sort is not None:
            h0, c0 = h0.index_select(1, sort), c0.index_select(1, sort)

        backend = resolve_backend(self.backend)
        D = self.num_directions
        layer_input = x
        h_n, c_n, records = [], [], []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(D):
                k = layer * D + direction
                res = lstm_layer(
                    backend,
                    layer_input,
                    h0[k],
                    c0[k],
                    self._weights(layer, direction),
                    batch_sizes,
                    bool(direction),
                    return_gates,
                )
                outs.append(res[0])
                h_n.append(res[1])
                c_n.append(res[2])
                if return_gates:
                    records.append((res[3], res[4], res[0]))
            layer_input = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input                                   # (T, B, D * out)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)          # (L * D, B, ·)
        if unsort is not None:
            h_n, c_n = h_n.index_select(1, unsort), c_n.index_select(1, unsort)

        if packed:
            output = PackedSequence(
                output.reshape(T * B, -1).index_select(0, flat_index),
                input.batch_sizes,
                input.sorted_indices,
                input.unsorted_indices,
            )
        else:
            if unsort is not None:
                output = output.index_select(1, unsort)
            if unbatched:
                output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
            elif self.batch_first:
                output = output.transpose(0, 1)
        if not return_gates:
            return output, (h_n, c_n)
        return output, (h_n, c_n), self._trace(records, unsort, unbatched)

    def _trace(self, records, unsort, unbatched: bool) -> GateTrace:
        """Assemble the GateTrace; i, f, g, o are views into one gates tensor (no copies)."""
        H = self.hidden_size

        def stack(tensors):  # (L * D, T, B, ·); one layer and direction needs no copy
            return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

        gates = stack([g for g, _, _ in records])             # (L * D, T, B, 4H)
        parts = {
            "i": gates[..., :H],
            "f": gates[..., H : 2 * H],
            "g": gates[..., 2 * H : 3 * H],
            "o": gates[..., 3 * H :],
            "c": stack([c for _, c, _ in records]),
            "h": stack([y.detach() for _, _, y in records]),
        }
        for name in FIELDS:
            t = parts[name]
            if unsort is not None:
                t = t.index_select(2, unsort)
            if unbatched:
                t = t.squeeze(2)
            elif self.batch_first:
                t = t.transpose(1, 2)
            parts[name] = t
        return GateTrace(**parts, num_directions=self.num_directions, batch_first=self.batch_first)

    # ---------------------------------------------------------------- input checks
    def _check_input(self, input) -> tuple[torch.Tensor, bool]:
        if not isinstance(input, torch.Tensor):
            raise TypeError(
                f"input must be a torch.Tensor or PackedSequence; got {type(input).__name__}"
            )
        if not input.is_floating_point():
            raise TypeError(
                f"input must be a floating-point tensor; got dtype {input.dtype}. Token ids "
                "go through an nn.Embedding first; otherwise convert with .float()"
            )
        ref = self.weight_ih_l0
        if input.dtype != ref.dtype:
            raise TypeError(
                f"input has dtype {input.dtype} but the LSTM's weights are {ref.dtype}; "
                f"convert one of them (input.to({ref.dtype}) or lstm.to({input.dtype}))"
            )
        if input.device != ref.device:
            raise ValueError(
                f"input is on {input.device} but the LSTM's weights are on {ref.device}; "
                "move one of them with .to(device)"
            )
        layout = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input must have rank 3 {layout} or 2 (T, input_size) for one sequence; "
                f"got shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"input has feature size {input.shape[-1]} (shape {tuple(input.shape)}); "
                f"expected input_size={self.input_size}, i.e. {layout}"
            )
        if input.dim() == 2:
            return input.unsqueeze(1), True
        if input.shape[0] == 0 or input.shape[1] == 0:
            raise ValueError(f"input has an empty batch or time dimension: {tuple(input.shape)}")
        return input, False

    def _sort_by_length(self, x: torch.Tensor, lengths):
        """Sort the batch by length, longest first; return (batch_sizes, sort, unsort, x)."""
        if lengths is None:
            return None, None, None, x
        T, B = x.shape[0], x.shape[1]
        if isinstance(lengths, torch.Tensor):
            if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
                raise TypeError(f"lengths must hold integers; got dtype {lengths.dtype}")
            lens = lengths.detach().to("cpu", torch.int64)
        else:
            try:
                lens = torch.as_tensor(list(lengths), dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(
                    f"lengths must be a 1-D sequence of ints; got {lengths!r}"
                ) from None
        if lens.dim() != 1 or lens.numel() != B:
            raise ValueError(
                f"lengths must have one entry per sequence: shape ({B},); "
                f"got shape {tuple(lens.shape)}"
            )
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 1 or hi > T:
            raise ValueError(
                f"lengths must lie in 1..{T} (the input's time dimension); got min {lo}, max {hi}"
            )
        if lo == T:
            return None, None, None, x  # every sequence is full length
        sorted_lens, sort = torch.sort(lens, descending=True, stable=True)
        batch_sizes = (torch.arange(T)[:, None] < sorted_lens[None, :]).sum(1).tolist()
        sort = sort.to(x.device)
        unsort = torch.empty_like(sort)
        unsort[sort] = torch.arange(B, device=x.device)
        x = x.index_select(1, sort)
        # Zero the padding so that nothing in it (even NaN) reaches the weight gradients.
        pad = torch.arange(T)[:, None] >= sorted_lens[None, :]
        x = x.masked_fill(pad.to(x.device).unsqueeze(-1), 0.0)
        return batch_sizes, sort, unsort, x

    def _initial_state(self, hx, B: int, x: torch.Tensor, unbatched: bool):
        LD = self.num_layers * self.num_directions
        out = self.proj_size or self.hidden_size
        if hx is None:
            return (
                x.new_zeros(LD, B, out),
                x.new_zeros(LD, B, self.hidden_size),
            )
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("hx must be a tuple (h_0, c_0) of two tensors")
        states = []
        for name, t, size in (("h_0", hx[0], out), ("c_0", hx[1], self.hidden_size)):
            expected = (LD, size) if unbatched else (LD, B, size)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"hx: {name} must be a tensor; got {type(t).__name__}")
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"hx: {name} has shape {tuple(t.shape)}; expected {expected} "
                    "(num_layers * num_directions, batch, "
                    f"{'proj_size' if name == 'h_0' and self.proj_size else 'hidden_size'})"
                )
            if t.dtype != x.dtype or t.device != x.device:
                raise TypeError(
                    f"hx: {name} is {t.dtype} on {t.device}; expected {x.dtype} on {x.device} "
                    "like the input"
                )
            states.append(t.unsqueeze(1) if unbatched else t)
        return states[0], states[1]


def _unpack(seq: PackedSequence):
    """Packed data -> (padded sorted (T, B, I), batch_sizes list, flat index of valid rows)."""
    batch_sizes = seq.batch_sizes.tolist()
    T, B = len(batch_sizes), batch_sizes[0]
    valid = torch.arange(B)[None, :] < seq.batch_sizes[:, None]       # (T, B) in packed order
    flat_index = valid.flatten().nonzero().squeeze(1).to(seq.data.device)
    data = seq.data
    x = data.new_zeros(T * B, data.shape[-1]).index_copy(0, flat_index, data)
    return x.view(T, B, -1), (None if batch_sizes[-1] == B else batch_sizes), flat_index


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")

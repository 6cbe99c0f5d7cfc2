"""What every glasslstm recurrent layer shares: torch's signature, weights, inputs and layout.

:class:`Recurrent` owns torch.nn.RNNBase's constructor arguments and parameter naming
(``weight_ih_l{k}[_reverse]`` ...), input checking, ``lengths=`` and ``PackedSequence``
handling (the batch is sorted by length and shrinks step by step, like a packed sequence),
initial states, layers, directions, inter-layer dropout and the gate trace. A subclass names
its gates and runs one layer in one direction: :class:`~glasslstm.lstm.LSTM`,
:class:`~glasslstm.rnn.GRU`, :class:`~glasslstm.rnn.RNN`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from glasslstm.errors import InputError, InputTypeError
from glasslstm.ops import resolve_backend
from glasslstm.trace import GateTrace

_WEIGHT_KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


class Recurrent(nn.Module):
    """Base of LSTM, GRU and RNN. Subclasses set the class attributes and ``_layer``."""

    mode: str  # "LSTM", "GRU", "RNN_TANH" or "RNN_RELU" (torch's names)
    gates: ClassVar[int]  # gate blocks in weight_ih's rows: LSTM 4, GRU 3, RNN 1
    state_names: ClassVar[tuple]  # ("h_0", "c_0") or ("h_0",)
    trace_fields: ClassVar[tuple]  # what return_gates records, in GateTrace order

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
        backend: str | None = None,
    ):
        super().__init__()
        _check_int("input_size", input_size, minimum=1)
        _check_int("hidden_size", hidden_size, minimum=1)
        _check_int("num_layers", num_layers, minimum=1)
        _check_int("proj_size", proj_size, minimum=0)
        _check_bool("bias", bias)
        _check_bool("batch_first", batch_first)
        if proj_size and self.mode != "LSTM":
            raise ValueError(
                f"proj_size={proj_size}: projections exist only for LSTM (LSTMP), not for "
                f"{type(self).__name__}; remove proj_size"
            )
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
                stacklevel=3,
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
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        G, D, out = self.gates, self.num_directions, proj_size or hidden_size
        self._flat_weights_names: list[str] = []
        # Registration order is torch's, so that reset_parameters() draws the same numbers
        # from the same seed as the torch module.
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out * D
            for direction in range(D):
                shapes: dict[str, tuple[int, ...] | None] = {
                    "weight_ih": (G * hidden_size, layer_in),
                    "weight_hh": (G * hidden_size, out),
                    "bias_ih": (G * hidden_size,) if bias else None,
                    "bias_hh": (G * hidden_size,) if bias else None,
                    "weight_hr": (proj_size, hidden_size) if proj_size else None,
                }
                for kind in _WEIGHT_KINDS:
                    shape = shapes[kind]
                    if shape is not None:
                        name = kind + _suffix(layer, direction)
                        setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                        self._flat_weights_names.append(name)
        self._register_extra_parameters(factory)
        self.reset_parameters()

    def _register_extra_parameters(self, factory: dict) -> None:
        """A subclass's own parameters (LSTM's layer normalisation and peepholes), registered
        after torch's so that the same seed still draws torch's weights. None here."""

    # ---------------------------------------------------------------- parameters
    def reset_parameters(self) -> None:
        """torch's init: every weight and bias uniform in ±1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def out_size(self) -> int:
        """Size of h: proj_size if projecting, else hidden_size."""
        return self.proj_size or self.hidden_size

    def _weights(self, layer: int, direction: int):
        """``(w_ih, w_hh, b_ih, b_hh, w_hr)`` of one layer and direction (None where absent)."""
        suffix = _suffix(layer, direction)
        return tuple(getattr(self, kind + suffix, None) for kind in _WEIGHT_KINDS)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer and direction, the parameters in torch's order (as torch has it)."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _all_weights(self) -> list[list[str]]:
        """torch's name lists: per layer and direction, its weights' names in torch's order."""
        names = self._flat_weights_names
        n = len(names) // (self.num_layers * self.num_directions)  # the same for every one
        return [names[i : i + n] for i in range(0, len(names), n)]

    @property
    def _flat_weights(self) -> list[torch.Tensor | None]:
        """torch's flat list of the weights as forward reads them: the Parameters, or the
        tensors a reparametrization (weight_norm, pruning, parametrize) puts in their place
        (None for a weight deleted and not yet replaced, as torch has it)."""
        return [getattr(self, name, None) for name in self._flat_weights_names]

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch's modules (no flat cuDNN buffer to compact)."""

    def _torch_kwargs(self) -> dict:
        return {
            "bias": self.bias,
            "batch_first": self.batch_first,
            "dropout": self.dropout,
            "bidirectional": self.bidirectional,
        }

    @classmethod
    def _torch_class(cls) -> type[nn.Module]:
        raise NotImplementedError

    @classmethod
    def from_torch(cls, module: nn.RNNBase, **kwargs):
        """This class with ``module``'s configuration, weights, device, dtype and mode."""
        ref = next(module.parameters())
        extra = {k: getattr(module, k) for k in cls._torch_only_kwargs()}
        ours = cls(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            device=ref.device,
            dtype=ref.dtype,
            **extra,
            **kwargs,
        )
        ours._load_torch_state(module.state_dict())
        ours.train(module.training)
        return ours

    def _load_torch_state(self, state: dict) -> None:
        """A torch module's state_dict into this one (strict: the same parameters)."""
        self.load_state_dict(state)

    @classmethod
    def _torch_only_kwargs(cls) -> tuple[str, ...]:
        """Constructor arguments specific to this kind (proj_size, nonlinearity)."""
        return ()

    def to_torch(self) -> nn.Module:
        """The torch module with this configuration and (copies of) these weights.

        Built only as an export target or test oracle; it computes nothing of ours."""
        ref = next(self.parameters())
        extra = {k: getattr(self, k) for k in self._torch_only_kwargs()}
        theirs = self._torch_class()(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            device=ref.device,
            dtype=ref.dtype,
            **self._torch_kwargs(),
            **extra,
        )
        theirs.load_state_dict(self.state_dict())
        theirs.train(self.training)
        return theirs

    def _repr_options(self) -> dict:
        """Options shown by repr when they differ from their defaults: name -> default."""
        return {
            "bias": True,
            "batch_first": False,
            "dropout": 0.0,
            "bidirectional": False,
            "backend": None,
        }

    def extra_repr(self) -> str:
        """torch's repr (its options in its order), then the options glasslstm adds."""
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in self._repr_options().items():
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)!r}"
        return s

    # ---------------------------------------------------------------- forward
    def _layer(
        self, backend: str, x, state, weights, batch_sizes, reverse: bool, record: bool, layer=0
    ):
        """One layer (number ``layer``), one direction: ``(y (T, B, out), final state (tuple),
        recorded)``.

        ``state`` is a tuple of (B, ·) tensors (``h`` or ``h, c``); ``recorded`` maps each of
        ``trace_fields`` to a detached (T, B, ·) tensor when ``record``, else None."""
        raise NotImplementedError

    def _layer_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """What layer ``layer`` reads of its input x (T, B, ·) in this forward pass: x itself
        here; a subclass may drop parts of it (LSTM's input_dropout)."""
        return x

    def _layer_output(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """What leaves layer ``layer`` of its output y (T, B, D * out): y itself here; a
        subclass may drop parts of it (LSTM's output_dropout)."""
        return y

    def _run(self, input, hx, lengths, return_gates: bool):
        """The shared forward: returns ``(output, states (tuple of (L*D, B, ·)), trace)``."""
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
            batch_sizes, sort, unsort, x = _sort_by_length(x, lengths)
        T, B = x.shape[0], x.shape[1]
        states0 = self._initial_state(hx, B, x, unbatched)
        if sort is not None:
            states0 = tuple(s.index_select(1, sort) for s in states0)

        backend = resolve_backend(self.backend)
        D = self.num_directions
        layer_input = x
        finals, records = [], []
        for layer in range(self.num_layers):
            outs = []
            layer_input = self._layer_input(layer, layer_input)
            for direction in range(D):
                k = layer * D + direction
                y, final, rec = self._layer(
                    backend,
                    layer_input,
                    tuple(s[k] for s in states0),
                    self._weights(layer, direction),
                    batch_sizes,
                    bool(direction),
                    return_gates,
                    layer,
                )
                outs.append(y)
                finals.append(final)
                records.append(rec)
            layer_input = self._layer_output(layer, outs[0] if D == 1 else torch.cat(outs, dim=2))
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input  # (T, B, D * out)
        states = tuple(torch.stack([f[j] for f in finals]) for j in range(len(states0)))
        if unsort is not None:
            states = tuple(s.index_select(1, unsort) for s in states)

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
                output = output.squeeze(1)
                states = tuple(s.squeeze(1) for s in states)
            elif self.batch_first:
                output = output.transpose(0, 1)
        trace = self._trace(records, unsort, unbatched) if return_gates else None
        return output, states, trace

    def _trace(self, records, unsort, unbatched: bool) -> GateTrace:
        """Stack each recorded field over layers and directions: (L * D, T, B, ·)."""
        values = {}
        for name in self.trace_fields:
            parts = [rec[name] for rec in records]
            # one layer and direction needs no copy
            t = parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)
            if unsort is not None:
                t = t.index_select(2, unsort)
            if unbatched:
                t = t.squeeze(2)
            elif self.batch_first:
                t = t.transpose(1, 2)
            values[name] = t
        return GateTrace(values, num_directions=self.num_directions, batch_first=self.batch_first)

    # ---------------------------------------------------------------- input checks
    def _check_input(self, input) -> tuple[torch.Tensor, bool]:
        if not isinstance(input, torch.Tensor):
            raise TypeError(
                f"input must be a torch.Tensor or PackedSequence; got {type(input).__name__}"
            )
        if not input.is_floating_point():
            raise InputTypeError(
                f"input must be a floating-point tensor; got dtype {input.dtype}. Token ids "
                "go through an nn.Embedding first; otherwise convert with .float()"
            )
        ref = self.weight_ih_l0
        if input.dtype != ref.dtype:
            raise InputTypeError(
                f"input has dtype {input.dtype} but the {type(self).__name__}'s weights are "
                f"{ref.dtype}; convert one of them (input.to({ref.dtype}) or "
                f"module.to({input.dtype}))"
            )
        if input.device != ref.device:
            raise InputError(
                f"input is on {input.device} but the {type(self).__name__}'s weights are on "
                f"{ref.device}; move one of them with .to(device)"
            )
        layout = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
        if input.dim() not in (2, 3):
            raise InputError(
                f"input must have rank 3 {layout} or 2 (T, input_size) for one sequence; "
                f"got shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise InputError(
                f"input has feature size {input.shape[-1]} (shape {tuple(input.shape)}); "
                f"expected input_size={self.input_size}, i.e. {layout}"
            )
        if input.shape[0 if input.dim() == 2 or not self.batch_first else 1] == 0:
            raise InputError(
                f"input has no time steps (shape {tuple(input.shape)}); an LSTM needs a sequence "
                "length of at least 1"
            )
        if input.dim() == 2:
            return input.unsqueeze(1), True
        return input, False  # a batch of 0 sequences is fine: empty outputs, as torch gives

    def _initial_state(self, hx, B: int, x: torch.Tensor, unbatched: bool) -> tuple:
        LD = self.num_layers * self.num_directions
        sizes = {"h_0": self.out_size, "c_0": self.hidden_size}
        names = self.state_names
        if hx is None:
            return tuple(x.new_zeros(LD, B, sizes[n]) for n in names)
        if len(names) == 1:
            if not isinstance(hx, torch.Tensor):
                raise TypeError(f"hx must be a tensor h_0; got {type(hx).__name__}")
            hx = (hx,)
        elif not isinstance(hx, (tuple, list)):
            raise TypeError(
                f"hx must be a tuple (h_0, c_0) of two tensors; got {type(hx).__name__}"
            )
        elif len(hx) != 2:  # a RuntimeError, as torch's "lstm expects two hidden states"
            raise InputError(f"hx must be a tuple (h_0, c_0) of two tensors; got {len(hx)} items")
        states = []
        for name, t in zip(names, hx):
            expected = (LD, sizes[name]) if unbatched else (LD, B, sizes[name])
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"hx: {name} must be a tensor; got {type(t).__name__}")
            if tuple(t.shape) != expected:
                what = "proj_size" if name == "h_0" and self.proj_size else "hidden_size"
                raise InputError(
                    f"hx: {name} has shape {tuple(t.shape)}; expected {expected} "
                    f"(num_layers * num_directions, batch, {what})"
                )
            if t.dtype != x.dtype or t.device != x.device:  # torch: a RuntimeError too
                raise InputError(
                    f"hx: {name} is {t.dtype} on {t.device}; expected {x.dtype} on {x.device} "
                    "like the input"
                )
            states.append(t.unsqueeze(1) if unbatched else t)
        return tuple(states)


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def _sort_by_length(x: torch.Tensor, lengths):
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
            raise TypeError(f"lengths must be a 1-D sequence of ints; got {lengths!r}") from None
    if lens.dim() != 1 or lens.numel() != B:
        raise ValueError(
            f"lengths must have one entry per sequence: shape ({B},); got shape {tuple(lens.shape)}"
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


def _unpack(seq: PackedSequence):
    """Packed data -> (padded sorted (T, B, I), batch_sizes list, flat index of valid rows)."""
    batch_sizes = seq.batch_sizes.tolist()
    T, B = len(batch_sizes), batch_sizes[0]
    valid = torch.arange(B)[None, :] < seq.batch_sizes[:, None]  # (T, B) in packed order
    flat_index = valid.flatten().nonzero().squeeze(1).to(seq.data.device)
    data = seq.data
    x = data.new_zeros(T * B, data.shape[-1]).index_copy(0, flat_index, data)
    return x.view(T, B, -1), (None if batch_sizes[-1] == B else batch_sizes), flat_index


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")


Lengths = torch.Tensor | Sequence[int] | None

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

The regularised family (layer normalisation, peepholes, zoneout, variational and recurrent
dropout, DropConnect, cell clipping) are keyword options, all off by default; the equations are
in :mod:`glasslstm.ops.variant` and :mod:`glasslstm.reference`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from glasslstm.ops import lstm_layer
from glasslstm.ops.recompute import checkpointed
from glasslstm.ops.step import drop_in_step
from glasslstm.ops.variant import Variant
from glasslstm.recurrent import Lengths, Recurrent, _check_int, _suffix

# the family's parameters per layer and direction: name prefix -> size in hidden units
_VARIANT_PARAMS = {
    "ln_weight_ih": 4,  # gain of the normalised input product x_t U^T     (layer_norm)
    "ln_weight_hh": 4,  # gain of the normalised recurrent product H W^T   (layer_norm)
    "ln_weight_c": 1,  # gain of the normalised cell before the output tanh (layer_norm)
    "ln_bias_c": 1,  # its bias                                            (layer_norm)
    "weight_ch": 3,  # peepholes p_i, p_o, p_f (ONNX's order for P)       (peephole)
}


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

    Keyword-only, the regularised LSTM family (each off by default: the module, its results
    and its ``state_dict`` are then exactly torch's). Masks are drawn with torch's global
    generator in every training-mode forward pass, so ``torch.manual_seed`` fixes them; in
    evaluation mode (``.eval()``) the dropouts are off and zoneout takes its expectation.
    They run in the fused C++ operator on the CPU (forward and hand-derived backward), in the
    autograd loop elsewhere; ``return_gates`` records the gates and states they produce.

        layer_norm: ``True``: layer normalisation (Ba et al. 2016, "Layer normalization";
            haste's LayerNormLSTM). The input product ``x_t U^T`` and the recurrent product
            ``H_{t-1} W^T`` are normalised separately over their 4H entries, each with its own
            gain (``ln_weight_ih_l{k}``, ``ln_weight_hh_l{k}``, 4H, initialised to 1) and bias
            (``bias_ih_l{k}`` and ``bias_hh_l{k}``: their sum is still the cell's bias ``b``),
            and the cell is normalised before the output tanh, ``H_t = o_t ⊙
            tanh(LN(C_t))`` with gain ``ln_weight_c_l{k}`` (1) and bias ``ln_bias_c_l{k}``
            (0), H each; ε = 1e-5.
        peephole: ``True``: peephole connections (Gers & Schmidhuber 2000): ``i_t`` and
            ``f_t`` also see ``C_{t-1}``, ``o_t`` sees ``C_t``, through one diagonal weight per
            gate: ``weight_ch_l{k}`` (3H: p_i, p_o, p_f, ONNX's order, so ONNX's ``P`` input is
            ``weight_ch_l{k}`` stacked with ``weight_ch_l{k}_reverse``), initialised like the
            other weights.
        cell_clip: ``v > 0`` clips the new cell state to [-v, v] at every step (the state
            itself, as TensorFlow's ``LSTMCell(cell_clip=...)``; ONNX's ``clip`` also bounds
            the gate pre-activations). ``0.0`` (default): no clipping.
        zoneout_c, zoneout_h: zoneout (Krueger et al. 2016, "Zoneout: regularizing RNNs by
            randomly preserving hidden activations"): in training each unit of ``C_t`` (of
            ``H_t``) keeps its previous value with probability z, a fresh mask per step,
            sequence and unit; in evaluation ``C_t = z C_{t-1} + (1 - z) C̃_t``, the
            expectation. As in the paper, ``H_t`` is computed from the new cell, not the
            zoned-out one. ``0.0`` (default): off; z in [0, 1).
        recurrent_dropout: variational dropout on the hidden state fed back (Gal &
            Ghahramani 2016, "A theoretically grounded application of dropout in recurrent
            neural networks"): ``H_{t-1} W^T`` reads ``H_{t-1} ⊙ m``, one mask m per sequence
            (and layer and direction) for all its steps, scaled by 1/(1 - p). The output
            ``H_t`` itself is not masked. ``0.0`` (default): off; p in [0, 1).
        input_dropout, output_dropout: variational dropout on each layer's input and output
            (Gal & Ghahramani 2016): one mask per sequence and feature, the same at every step,
            scaled by 1/(1 - p). A float applies to every layer, a sequence of ``num_layers``
            floats gives each layer its own (AWD-LSTM's dropouti, dropouth, dropout are
            ``input_dropout=(0.65, 0.3, 0.3)``, ``output_dropout=(0, 0, 0.4)`` for three
            layers). ``output`` carries the last layer's output mask; ``h_n`` is never masked.
            Default ``0.0``: off.
        weight_dropout: DropConnect on the recurrent weights (Wan et al. 2013; the "weight
            drop" of Merity et al. 2017, "Regularizing and optimizing LSTM language models"):
            in training every ``weight_hh_l{k}`` is multiplied by a mask drawn once per forward
            pass (each entry kept with probability 1 - p, scaled by 1/(1 - p)), the same for
            all steps and sequences. ``0.0`` (default): off; p in [0, 1).
    """

    forget_bias: float
    chrono_init: int
    checkpoint: int
    layer_norm: bool
    peephole: bool
    cell_clip: float
    zoneout_c: float
    zoneout_h: float
    recurrent_dropout: float
    weight_dropout: float
    input_dropout: tuple[float, ...]
    output_dropout: tuple[float, ...]
    _weight_names: frozenset[str]  # torch's weights, by name (the drop-in step's condition)
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
        layer_norm: bool = False,
        peephole: bool = False,
        cell_clip: float = 0.0,
        zoneout_c: float = 0.0,
        zoneout_h: float = 0.0,
        recurrent_dropout: float = 0.0,
        input_dropout: float | Sequence[float] = 0.0,
        output_dropout: float | Sequence[float] = 0.0,
        weight_dropout: float = 0.0,
    ) -> None:
        _check_int("checkpoint", checkpoint, minimum=0)
        for name, flag in (("layer_norm", layer_norm), ("peephole", peephole)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False; got {flag!r}")
        self.layer_norm, self.peephole = layer_norm, peephole
        if not isinstance(cell_clip, numbers.Real) or isinstance(cell_clip, bool):
            raise TypeError(f"cell_clip must be a number; got {cell_clip!r}")
        if not (math.isfinite(cell_clip) and float(cell_clip) >= 0):
            raise ValueError(f"cell_clip={cell_clip!r} must be >= 0 (0: no clipping)")
        self.cell_clip = float(cell_clip)
        self.zoneout_c = _rate("zoneout_c", zoneout_c)
        self.zoneout_h = _rate("zoneout_h", zoneout_h)
        self.recurrent_dropout = _rate("recurrent_dropout", recurrent_dropout)
        self.weight_dropout = _rate("weight_dropout", weight_dropout)
        self.input_dropout = _rates("input_dropout", input_dropout, num_layers)
        self.output_dropout = _rates("output_dropout", output_dropout, num_layers)
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

    def _register_extra_parameters(self, factory: dict) -> None:
        H = self.hidden_size
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                for name, units in _VARIANT_PARAMS.items():
                    if self._uses(name):
                        shape = (units * H,)
                        param = nn.Parameter(torch.empty(shape, **factory))
                        setattr(self, name + _suffix(layer, direction), param)

    def _uses(self, name: str) -> bool:
        """Whether this module has the family's parameter ``name`` (a _VARIANT_PARAMS key)."""
        return self.peephole if name == "weight_ch" else self.layer_norm

    def _variant_params(self, layer: int, direction: int) -> tuple:
        """``(ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c, weight_ch)`` of one layer and
        direction, None where absent."""
        suffix = _suffix(layer, direction)
        return tuple(getattr(self, name + suffix, None) for name in _VARIANT_PARAMS)

    def reset_parameters(self) -> None:
        """torch.nn.LSTM's init (uniform ±1/sqrt(hidden_size)), plus ``forget_bias`` or
        ``chrono_init``; layer normalisation's gains 1 and its cell bias 0."""
        super().reset_parameters()
        if self.layer_norm:
            with torch.no_grad():
                for layer in range(self.num_layers):
                    for direction in range(self.num_directions):
                        g_ih, g_hh, g_c, b_c, _ = self._variant_params(layer, direction)
                        for gain in (g_ih, g_hh, g_c):
                            gain.fill_(1.0)
                        b_c.zero_()
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
        return {
            **super()._repr_options(),
            "forget_bias": 0.0,
            "checkpoint": 0,
            "chrono_init": 0,
            "layer_norm": False,
            "peephole": False,
            "cell_clip": 0.0,
            "zoneout_c": 0.0,
            "zoneout_h": 0.0,
            "recurrent_dropout": 0.0,
            "input_dropout": (0.0,) * self.num_layers,
            "output_dropout": (0.0,) * self.num_layers,
            "weight_dropout": 0.0,
        }

    @property
    def plain_cell(self) -> bool:
        """True when every step is the article's cell (no layer normalisation, peepholes,
        clipping or zoneout); the dropouts act only in training and leave it so."""
        return not (
            self.layer_norm or self.peephole or self.cell_clip or self.zoneout_c or self.zoneout_h
        )

    @property
    def draws_masks(self) -> bool:
        """True when the family draws random masks in a training-mode forward pass (zoneout,
        recurrent, input, output or weight dropout; torch's ``dropout`` aside)."""
        return bool(
            self.zoneout_c
            or self.zoneout_h
            or self.recurrent_dropout
            or self.weight_dropout
            or any(self.input_dropout)
            or any(self.output_dropout)
        )

    def _load_torch_state(self, state: dict) -> None:
        """torch's weights into this module; the family's own parameters (``layer_norm``,
        ``peephole``), which torch has none of, keep their initial values."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        own = {n for n in missing if n.split("_l")[0] in _VARIANT_PARAMS}
        if unexpected or set(missing) - own:
            self.load_state_dict(state)  # strict: raises torch's error naming the keys

    def to_torch(self) -> nn.Module:
        """The torch module with this configuration and (copies of) these weights. torch has
        no layer normalisation, peepholes, clipping or zoneout: a module with one of those
        cannot be converted (its dropouts, which act only in training, are left behind)."""
        if not self.plain_cell:
            raise ValueError(
                "torch.nn.LSTM has no layer_norm, peephole, cell_clip or zoneout; only an LSTM "
                "without them converts (export the state_dict instead)"
            )
        return super().to_torch()

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
        if not return_gates and lengths is None and not torch.is_grad_enabled():
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

    def _layer(self, backend, x, state, weights, batch_sizes, reverse, record, layer=0):
        variant = self._variant(layer, int(reverse), x)
        if self.weight_dropout and self.training:  # DropConnect: one mask per forward pass
            w_hh = weights[1] * _dropout_mask(torch.empty_like(weights[1]), self.weight_dropout)
            weights = (weights[0], w_hh, *weights[2:])
        # zoneout's masks have a time axis: checkpointing hands each segment its own steps
        timed = tuple(
            m for m in (variant.zoneout_c, variant.zoneout_h) if m is not None and m.dim() == 3
        )

        def run(x, state, params, batch_sizes, record, *masks):
            v = variant._replace(**dict(zip(_TIMED, masks))) if masks else variant
            v = v._replace(**dict(zip(_VARIANT_FIELDS, params[5:])))
            return lstm_layer(
                backend, x, state[0], state[1], params[:5], batch_sizes, reverse, record, v
            )

        params = (*weights, *variant[:5])
        res = checkpointed(
            run, self.checkpoint, x, state, params, batch_sizes, reverse, record, timed
        )
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

    def _variant(self, layer: int, direction: int, x: torch.Tensor) -> Variant:
        """This forward pass's :class:`~glasslstm.ops.variant.Variant` for one layer and
        direction: the family's parameters, and its masks drawn now (training) or its
        expectations (evaluation). ``x``: the layer's input (T, B, ·)."""
        T, B = x.shape[0], x.shape[1]
        H, P = self.hidden_size, self.out_size

        def zoneout(z: float, width: int) -> torch.Tensor | None:  # 1: the unit keeps its value
            if not z:
                return None
            return _keep_mask(x.new_empty(T, B, width), z) if self.training else x.new_tensor(z)

        zoneout_c, zoneout_h = zoneout(self.zoneout_c, H), zoneout(self.zoneout_h, P)
        h_mask = None
        if self.recurrent_dropout and self.training:
            h_mask = _dropout_mask(x.new_empty(B, P), self.recurrent_dropout)
        ln_ih, ln_hh, ln_c, ln_c_bias, peephole = self._variant_params(layer, direction)
        return Variant(
            ln_ih, ln_hh, ln_c, ln_c_bias, peephole, zoneout_c, zoneout_h, h_mask, self.cell_clip
        )

    def _layer_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = self.input_dropout[layer]
        if not (p and self.training):
            return x
        return x * _dropout_mask(x.new_empty(x.shape[1], x.shape[2]), p)  # same at every step

    def _layer_output(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        p = self.output_dropout[layer]
        if not (p and self.training):
            return y
        return y * _dropout_mask(y.new_empty(y.shape[1], y.shape[2]), p)


_TIMED = ("zoneout_c", "zoneout_h")
_VARIANT_FIELDS = Variant._fields[:5]


# Every mask a forward pass draws comes from one of these two, in this order for each layer:
# its input's, then per direction zoneout's on c and h, recurrent dropout's, DropConnect's, then
# its output's (those that are on).
# (A uniform draw compared with the rate: the same distribution as bernoulli_, drawn about twice
# as fast on the CPU; DropConnect's 4H x H mask each forward pass is where that shows.)
def _dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """``like`` (overwritten) filled with 0 (probability p) or 1/(1-p): inverted dropout."""
    return like.uniform_().ge_(p).div_(1.0 - p)


def _keep_mask(like: torch.Tensor, z: float) -> torch.Tensor:
    """``like`` (overwritten) filled with 1 (probability z: the unit keeps its value) or 0."""
    return like.uniform_().lt_(z)


def _rate(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number in [0, 1); got {value!r}")
    if not 0 <= float(value) < 1:
        raise ValueError(f"{name}={value!r} must be in [0, 1) (0: off)")
    return float(value)


def _rates(name: str, value, num_layers: int) -> tuple[float, ...]:
    """A rate for every layer: one number for all, or a sequence of ``num_layers``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (_rate(name, value),) * num_layers
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a number or one number per layer; got {value!r}")
    if len(value) != num_layers:
        raise ValueError(
            f"{name} has {len(value)} rates for {num_layers} layers; give one number for all "
            "layers or one per layer"
        )
    return tuple(_rate(f"{name}[{k}]", v) for k, v in enumerate(value))

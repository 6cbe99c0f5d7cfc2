"""The one-token step of an LSTM on the CPU: its weights in the step's layout, and the drop-in
call ``lstm(x_t, (h, c))``.

A step of one sequence is a matrix-vector product per layer, memory-bound: the C++ step
(``torch.ops.glasslstm.lstm_step`` / ``stream_step_``) streams each layer's ``[U W]`` stored
as panels of rows (see csrc/kernels_impl.h) and does the gate math in the same pass.
:class:`StepWeights` keeps those copies of a module's weights and rebuilds them when a weight
changes (an optimizer step, ``load_state_dict``, a replaced parameter): their version counters
and storages are compared on every call.

:func:`drop_in_step` is what :meth:`glasslstm.LSTM.forward` tries first for a one-token call of
one sequence under ``torch.no_grad()``: the generation loop of code written for
torch.nn.LSTM, through the same C++ step. Everything else (and anything it cannot take) goes
down the general path.
"""

from __future__ import annotations

import torch

from glasslstm.ops import native, resolve_backend

DTYPES = (torch.float32, torch.float64)


def possible(lstm, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the C++ step can run ``lstm`` (unidirectional, on the CPU, float32/64)."""
    return (
        device.type == "cpu"
        and dtype in DTYPES
        and not lstm.bidirectional
        and getattr(lstm, "plain_cell", True)  # the step has the article's cell only
        and resolve_backend(lstm.backend) in ("auto", "fused")
        and native.available()
    )


def _panels(w: torch.Tensor, panel: int) -> torch.Tensor:
    """(rows, k) -> (ceil(rows / panel), k, panel): each block of ``panel`` rows transposed into
    its own contiguous matrix, rows past the end zero."""
    rows, k = w.shape
    n = -(-rows // panel)
    padded = w.new_zeros(n * panel, k)
    padded[:rows] = w
    return padded.view(n, panel, k).transpose(1, 2).contiguous()


class StepWeights:
    """An LSTM's weights in the step's layout, kept current (see the module docstring).

    ``lstm``: a unidirectional :class:`glasslstm.LSTM` on the CPU (float32/float64)."""

    def __init__(self, lstm):
        self.lstm = lstm
        self.dtype = lstm.weight_hh_l0.dtype
        self.L, self.H = lstm.num_layers, lstm.hidden_size
        self.P = lstm.proj_size or lstm.hidden_size
        self.panel, work = torch.ops.glasslstm.step_sizes(self.H)
        self.work = torch.empty(work, dtype=self.dtype)  # Stream's scratch
        # weight-only int8 panels where the module was quantized (glasslstm.quantize)
        self.int8 = getattr(lstm, "quantized", None) == "int8" and self.dtype == torch.float32
        self.weights8: torch.Tensor | None = None
        self._key: list | None = None
        # the kernels called directly (eager: no dispatcher), else through the operators
        direct = native.direct()
        ops = torch.ops.glasslstm
        self.lstm_step = direct.lstm_step if direct is not None else ops.lstm_step
        self.stream_step = direct.stream_step_ if direct is not None else ops.stream_step_
        # the C++ side's copy of what the weights were made from (DropIn: it also runs the
        # drop-in call): asking it whether they changed is the cheap first test of refresh
        self.names = tuple(lstm._flat_weights_names)
        self.watch = (
            direct.DropIn(list(self.names), self.L, self.H, self.P, lstm.input_size, self.dtype)
            if direct is not None
            else None
        )
        self._held: list = []
        self.back = False  # the zig-zag order of the panels, flipped by every step
        self.builds = 0  # times the copies were (re)built: a key for what is made from them

    def key(self) -> list:
        """What identifies the weights as they are: each tensor forward reads (a Parameter, or
        what pruning or a parametrization put in its place), its version counter (bumped by
        every in-place change) and storage (a swapped ``.data``). The tensors of the last
        refresh are held (``_held``), so a new one cannot reuse an old one's id or memory."""
        params, names = self.lstm._parameters, self.names
        try:  # registered Parameters: a plain dict lookup each (the one-token call's hot path)
            tensors = [params[name] for name in names]
        except KeyError:  # a weight that pruning or a parametrization recomputes: forward's
            tensors = self.lstm._flat_weights
        return [(id(p), p._version, p.data_ptr()) for p in tensors]

    def refresh(self) -> bool:
        """Re-read the weights when they changed; when they did not, one C++ comparison of
        the registered parameters with those of the last build (``watch``). False when they can
        no longer run here (moved off the CPU, another dtype)."""
        params = self.lstm._parameters
        if self.watch is not None and self.watch.same(params):
            return True
        key = self.key()
        if key != self._key and not self._build(key):
            return False
        if self.watch is not None and all(name in params for name in self.names):
            self.watch.set(
                self.weights, self.layout, self.weights8, [params[n] for n in self.names]
            )
        return True

    def _build(self, key: list) -> bool:
        """The step's copies of the weights as ``key`` identifies them; False where they can
        no longer run here."""
        w = self.lstm.weight_hh_l0
        if w.dtype != self.dtype or w.device.type != "cpu":
            return False
        # one flat tensor (every layer's panels, bias sum, W_hr^T; with int8, the panels'
        # scales instead of the panels, which go to an int8 tensor) and a table of where each
        # part starts: what the step operator takes
        floats: list[torch.Tensor] = []
        int8s: list[torch.Tensor] = []
        layout: list[int] = []
        sizes = {"f": 0, "i": 0}

        def put(t: torch.Tensor | None, kind: str = "f") -> int:
            if t is None:
                return -1
            start = sizes[kind]
            (floats if kind == "f" else int8s).append(t.reshape(-1))
            sizes[kind] += t.numel()
            return start

        with torch.no_grad():
            for layer in range(self.L):
                w_ih, w_hh, b_ih, b_hh, w_hr = self.lstm._weights(layer, 0)
                uw = torch.cat([w_ih, w_hh], 1)
                if self.int8:
                    q, scale = _int8_rows(uw, self.panel)
                    panels, scales = put(_panels(q, self.panel), "i"), put(scale)
                else:
                    panels, scales = put(_panels(uw, self.panel)), -1
                bias = put(None if b_ih is None else b_ih + b_hh)
                whr = put(None if w_hr is None else w_hr.t())
                layout += [panels, bias, whr, w_ih.shape[1], scales]
        self.weights = torch.cat(floats) if floats else torch.empty(1, dtype=self.dtype)
        self.weights8 = torch.cat(int8s) if int8s else None
        self.layout = torch.tensor(layout, dtype=torch.int64)
        self._key = key
        self._held = self.lstm._flat_weights  # kept alive: their ids and memory stay theirs
        self.builds += 1
        return True

    def flip(self) -> bool:
        """This step's panel order (and the next one's, reversed)."""
        self.back = not self.back
        return self.back


def _int8_rows(w: torch.Tensor, panel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (rows, k) as int8 with one scale per row (``w ~ q * scale[:, None]``), the rows
    padded to a multiple of ``panel`` (scale 1, values 0)."""
    from glasslstm.quantize import int8_rows

    q, scale = int8_rows(w)
    pad = -w.shape[0] % panel
    if pad:
        q = torch.cat([q, q.new_zeros(pad, q.shape[1])])
        scale = torch.cat([scale, scale.new_ones(pad)])
    return q, scale


_STEP_BACKENDS = frozenset((None, "auto", "fused"))


class DropInStep:
    """What a module keeps for its drop-in calls (built on the first one): the weights in the
    step's layout, whose C++ side (``DropIn`` of the library's module) checks a call and runs
    it (``call``)."""

    def __init__(self, lstm):
        self.owner = id(lstm)  # a copied module's __dict__ must not reuse this plan
        self.weights = StepWeights(lstm)
        self.call = self.weights.watch


def drop_in_step(lstm, input, hx):
    """``(output, (h_n, c_n))`` of a one-token call of one sequence through the C++ step, or
    None where this call is not such a step or the step cannot take it (the general path then
    handles it, errors included). The checks of the input, the state and the weights' versions
    run in C++ (``DropIn``); the module's settings, which Python code may change between
    calls, are read here."""
    if torch.compiler.is_compiling():
        return None  # compilers must see the general path's operators
    if (
        (lstm.training and ((lstm.dropout and lstm.num_layers > 1) or lstm.draws_masks))
        or lstm.backend not in _STEP_BACKENDS
        or not lstm.plain_cell
    ):
        return None
    plan = lstm.__dict__.get("_drop_in")
    if plan is None or plan.owner != id(lstm):
        if type(input) is not torch.Tensor or input.dim() not in (2, 3) or input.shape[0] != 1:
            return None  # not a step: no plan (and no weight copies) for this module yet
        if not lstm._weight_names.issubset(lstm._parameters):
            return None  # a weight that pruning or a parametrization recomputes
        w = lstm.weight_hh_l0
        if not possible(lstm, w.device, w.dtype):
            return None
        plan = lstm._drop_in = DropInStep(lstm)
        if not plan.weights.refresh():
            lstm._drop_in = None
            return None
    result = plan.call(lstm._parameters, input, hx)
    if result is NotImplemented:  # a weight changed: new copies, then the call
        if not plan.weights.refresh():  # the weights moved off the CPU or changed dtype
            lstm._drop_in = None
            return None
        result = plan.call(lstm._parameters, input, hx)
    return result

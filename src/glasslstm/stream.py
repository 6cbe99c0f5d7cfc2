"""Streaming inference: one token at a time, the state kept, nothing allocated per step.

:class:`Stream` wraps a :class:`glasslstm.LSTM`; :class:`LMStream` a whole
:class:`~glasslstm.LanguageModel` (embedding -> LSTM -> output layer), which ``generate``,
``predict`` and the CLI use. On the CPU (float32/float64, a C compiler present) each step is a
single call into :mod:`glasslstm.ops.cpu`: every layer's matrix-vector products and gate math,
written into buffers allocated once. Elsewhere (CUDA, no compiler) the same API runs the
module's own forward under ``torch.no_grad()``.

Weights are read where they live, so a stream follows in-place updates (an optimizer step,
``load_state_dict``); sums it precomputes (``b_ih + b_hh``, a language model's embedding pushed
through the first layer's ``U``) are rebuilt when a parameter's version counter or storage
changes.

    >>> s = Stream(lstm)               # zero state
    >>> h = s.step(x_t)                # (input_size,) -> the top layer's H_t, (out,)
    >>> h_all, c_all = s.state         # (num_layers, 1, out) and (num_layers, 1, hidden)
"""

from __future__ import annotations

import ctypes

import torch

from glasslstm.ops import cpu, ext, resolve_backend


class _StepPlan(ctypes.Structure):
    """``glasslstm_step_plan`` of cpu_kernels.c: what a step keeps from call to call."""

    _fields_ = [
        ("L", ctypes.c_int64),
        ("H", ctypes.c_int64),
        ("P", ctypes.c_int64),
        ("in_sizes", ctypes.c_void_p),
        ("layers", ctypes.c_void_p),
        ("work", ctypes.c_void_p),
        ("phase", ctypes.c_int64),
    ]


class StepKernel:
    """The C one-token step for an LSTM's weights (panel copies, bias sums), kept current.

    ``lstm`` is a unidirectional :class:`glasslstm.LSTM` (or anything with its ``_weights``,
    ``_parameters``, ``num_layers``, ``hidden_size``, ``proj_size``, ``input_size``) on the CPU.
    """

    def __init__(self, lstm):
        self.lstm = lstm
        self.dtype = lstm.weight_hh_l0.dtype
        lib = cpu.library()
        fn = getattr(lib, f"glasslstm_step_{cpu.SUFFIX[self.dtype]}")
        # Called with the GIL held (a PYFUNCTYPE; ctypes' CDLL functions release it): the
        # plan's scratch is this module's, so two Python threads stepping it take turns, as
        # they do through glasslstm.ops.ext, which keeps the GIL too.
        self._step = ctypes.PYFUNCTYPE(None, *fn.argtypes)(ctypes.cast(fn, ctypes.c_void_p).value)
        self.L, self.H = lstm.num_layers, lstm.hidden_size
        self.P = lstm.proj_size or lstm.hidden_size
        self.work = torch.empty(lib.glasslstm_step_work(self.H), dtype=self.dtype)
        self._panel = lib.glasslstm_step_panel()
        self._plan = _StepPlan(self.L, self.H, self.P, None, None, self.work.data_ptr(), 0)
        self._plan_ptr = ctypes.addressof(self._plan)
        self._params = lstm._parameters  # the live dict: a replaced parameter is seen too
        self._key = None
        # the same facts for glasslstm.ops.ext's drop_in: a header of int64 {plan, step, key
        # addresses, L, H, P, I, dtype, n}; the key as 2 n int64 (version, data pointer), set
        # last by refresh, so that drop_in never steps a plan refresh is half-way through (it
        # sees the weights changed and hands the call back)
        self.header = (ctypes.c_int64 * 9)(
            self._plan_ptr,
            ctypes.cast(self._step, ctypes.c_void_p).value,
            0,
            self.L,
            self.H,
            self.P,
            lstm.input_size,
            0 if self.dtype == torch.float32 else 1,
            0,
        )
        self.header_addr = ctypes.addressof(self.header)

    def key(self) -> list:
        return [(p._version, p.data_ptr()) for p in self._params.values()]

    def refresh(self) -> bool:
        """Re-read the weights when they changed (cheap: compares version counters and
        storages). False when they can no longer run here (moved off the CPU, another dtype):
        build a new kernel then."""
        key = self.key()
        if key == self._key:
            return True
        w = self.lstm.weight_hh_l0
        if w.dtype != self.dtype or w.device.type != "cpu":
            return False
        keep, ptrs, sizes = [], [], []
        for layer in range(self.L):
            w_ih, w_hh, b_ih, b_hh, w_hr = self.lstm._weights(layer, 0)
            w_ih, w_hh = w_ih.detach(), w_hh.detach()
            bias = None if b_ih is None else (b_ih + b_hh).detach().contiguous()
            # [U W] cut into panels of rows, each its own contiguous (in + P, panel) block,
            # and W_hr transposed: the layouts the C step streams (see cpu_kernels.c)
            mats = [
                _panels(torch.cat([w_ih, w_hh], 1), self._panel),
                bias,
                None if w_hr is None else w_hr.detach().t().contiguous(),
            ]
            keep += mats
            ptrs += [None if m is None else m.data_ptr() for m in mats]
            sizes.append(w_ih.shape[1])
        self._keep = keep  # the tensors the pointers point into
        self._layers = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self._sizes = (ctypes.c_int64 * self.L)(*sizes)
        self._plan.layers = ctypes.addressof(self._layers)
        self._plan.in_sizes = ctypes.addressof(self._sizes)
        self._key = key
        flat = [v for pair in key for v in pair]
        self._key_buf = (ctypes.c_int64 * max(len(flat), 1))(*flat)
        self.header[2] = ctypes.addressof(self._key_buf)
        self.header[8] = len(key)
        return True

    def __call__(self, x_ptr, xproj_ptr, h, c, out, h_in=None, c_in=None) -> None:
        """One step in place: ``h`` (L, P) and ``c`` (L, H) contiguous (``h_in``/``c_in``, when
        given, copied into them first); writes ``out`` (P)."""
        self._step(
            self._plan_ptr, x_ptr, xproj_ptr, h_in, c_in, h.data_ptr(), c.data_ptr(), out.data_ptr()
        )


def _panels(w: torch.Tensor, panel: int) -> torch.Tensor:
    """(rows, k) -> (ceil(rows / panel), k, panel): each block of ``panel`` rows transposed into
    its own contiguous matrix, rows past the end zero."""
    rows, k = w.shape
    n = -(-rows // panel)
    padded = w.new_zeros(n * panel, k)
    padded[:rows] = w
    return padded.view(n, panel, k).transpose(1, 2).contiguous()


def fused_step_possible(lstm, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :class:`StepKernel` can run this LSTM here."""
    return (
        device.type == "cpu"
        and dtype in cpu.SUFFIX
        and not lstm.bidirectional
        and resolve_backend(lstm.backend) in ("auto", "fused")
        and cpu.available()
    )


class DropInStep:
    """``lstm(x_t, hx)`` for ONE step of ONE sequence under no_grad, through the C kernel:
    what a drop-in user's generation loop calls (:meth:`glasslstm.LSTM.__call__` tries it
    first). Built once per module and kept on it; each call re-checks what can change between
    calls (:func:`drop_in_step`: ``lstm.backend``, dropout; here: shapes, dtypes, devices, the
    weights). Like
    :class:`Stream`, it reads ``$GLASSLSTM_BACKEND`` when it is built (the module's first
    such step), not on every call.

    Once :mod:`glasslstm.ops.ext` is built (started in the background by the first plan), its
    C++ ``drop_in`` does the checks, the three allocations and the step in one call (~2 us
    instead of ~10 in Python); anything it does not handle comes back here.
    """

    _FAST_BACKENDS = (None, "auto", "fused")

    def __init__(self, lstm):
        self.owner = id(lstm)  # a copied module's __dict__ must not reuse this plan
        self.kernel = StepKernel(lstm)
        self.kernel.refresh()
        self.header_addr = self.kernel.header_addr
        self.ext = None  # glasslstm.ops.ext's drop_in, once built
        ext.build_async()  # the C++ entry point; this Python path serves until it is ready
        dt, L, H, P, I = (
            self.kernel.dtype,
            lstm.num_layers,
            lstm.hidden_size,
            lstm.proj_size or lstm.hidden_size,
            lstm.input_size,
        )
        self.dtype, self.multi, self.single = dt, L > 1, L == 1
        self.x3, self.x2 = torch.Size((1, 1, I)), torch.Size((1, I))
        self.h3, self.c3 = torch.Size((L, 1, P)), torch.Size((L, 1, H))
        self.h2, self.c2 = torch.Size((L, P)), torch.Size((L, H))
        self.y3, self.y2 = (1, 1, P), (1, P)

    def __call__(self, lstm, input, hx):
        """``(output, (h_n, c_n))``, or None when this call is not such a step (the general
        path then handles it, errors included). Lean on purpose: after a step has streamed
        the weights through the caches, every line of Python here runs cold."""
        if type(input) is not torch.Tensor:
            return None
        if self.ext is None and ext.module() is not None:
            self.ext = ext.module().drop_in
        shape = input.shape
        if shape == self.x3:
            sh, sc, sy = self.h3, self.c3, self.y3
        elif shape == self.x2:
            sh, sc, sy = self.h2, self.c2, self.y2
        else:
            return None
        dt = self.dtype
        if input.dtype is not dt or not input.is_cpu:
            return None
        if hx is None:
            h_in = c_in = None
            h_n, c_n = torch.zeros(sh, dtype=dt), torch.zeros(sc, dtype=dt)
        else:
            if type(hx) not in (tuple, list) or len(hx) != 2:
                return None
            h0, c0 = hx
            if (
                h0.shape != sh
                or c0.shape != sc
                or h0.dtype is not dt
                or c0.dtype is not dt
                or not h0.is_cpu
                or not c0.is_cpu
                or not h0.is_contiguous()
                or not c0.is_contiguous()
            ):
                return None
            h_in, c_in = h0.data_ptr(), c0.data_ptr()  # copied in by the kernel
            h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)  # contiguous, as h0, c0
        if not input.is_contiguous():
            input = input.contiguous()
        # one layer: the output has h_n's shape ((1, 1, P) or (1, P))
        out = torch.empty_like(h_n) if self.single else torch.empty(sy, dtype=dt)
        if not self.kernel.refresh():  # the weights moved or changed dtype
            lstm._drop_in = None
            return drop_in_step(lstm, input, hx)  # a new plan, or the general path
        self.kernel(input.data_ptr(), None, h_n, c_n, out, h_in, c_in)
        return out, (h_n, c_n)


def drop_in_step(lstm, input, hx):
    """:class:`DropInStep` for ``lstm``, built (or rebuilt) as needed; None where the C step
    cannot run or this call is not a one-token step."""
    if torch._C._get_tracing_state():  # torch.jit.trace must see the torch ops
        return None
    plan = lstm._drop_in
    if plan is None or plan.owner != id(lstm):
        if type(input) is not torch.Tensor or input.dim() not in (2, 3) or input.shape[0] != 1:
            return None  # not a step: no plan (and no weight copies) for this module yet
        w = lstm.weight_hh_l0
        if not fused_step_possible(lstm, w.device, w.dtype):
            return None
        plan = lstm._drop_in = DropInStep(lstm)
    # what can change between calls and sends them down the module's forward
    if lstm.backend not in plan._FAST_BACKENDS or (lstm.training and lstm.dropout and plan.multi):
        return None
    if plan.ext is not None:  # the C++ entry point: the common case, whole
        res = plan.ext(plan.header_addr, lstm._parameters, input, hx)
        if res is not None:
            return res
    return plan(lstm, input, hx)


def _check_lstm(lstm) -> None:
    from glasslstm.lstm import LSTM

    if not isinstance(lstm, LSTM):
        raise TypeError(
            f"Stream needs a glasslstm.LSTM; got {type(lstm).__name__} "
            "(glasslstm.LSTM.from_torch(module) converts a torch.nn.LSTM)"
        )
    if lstm.bidirectional:
        raise ValueError("a bidirectional LSTM needs the whole sequence; it cannot stream")


class Stream:
    """One input vector at a time through an LSTM; see the module docstring.

    Args:
        lstm: a unidirectional :class:`glasslstm.LSTM`.
        state: optional ``(h, c)`` to start from, shaped like torch's ``hx`` for batch 1:
            ``(num_layers, 1, out)`` and ``(num_layers, 1, hidden)`` (or without the 1).
    """

    def __init__(self, lstm, state=None):
        _check_lstm(lstm)
        self.lstm = lstm
        w = lstm.weight_hh_l0
        self.device, self.dtype = w.device, w.dtype
        L, H, P = lstm.num_layers, lstm.hidden_size, lstm.proj_size or lstm.hidden_size
        self.h = torch.zeros(L, P, device=self.device, dtype=self.dtype)
        self.c = torch.zeros(L, H, device=self.device, dtype=self.dtype)
        self.out = torch.empty(P, device=self.device, dtype=self.dtype)
        self._x = torch.empty(lstm.input_size, device=self.device, dtype=self.dtype)
        self._kernel = (
            StepKernel(lstm) if fused_step_possible(lstm, self.device, self.dtype) else None
        )
        if state is not None:
            self.reset(state)

    @property
    def fused(self) -> bool:
        """True when steps run in the C kernel (else in the module's torch forward)."""
        return self._kernel is not None

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, c)`` as ``(num_layers, 1, ...)`` views: pass them as ``hx`` to the module."""
        return self.h.unsqueeze(1), self.c.unsqueeze(1)

    def reset(self, state=None) -> None:
        """Back to the zero state, or to ``state`` = ``(h, c)``."""
        if state is None:
            self.h.zero_()
            self.c.zero_()
            return
        h, c = state
        for name, src, dst in (("h", h, self.h), ("c", c, self.c)):
            src = src.detach()
            if src.dim() == 3 and src.shape[1] == 1:
                src = src[:, 0]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"state {name} must be {tuple(dst.shape)} (or with a batch "
                    f"dimension of 1); got {tuple(src.shape)}"
                )
            dst.copy_(src)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Feed ``x`` (input_size,); return the top layer's new ``H_t`` (out,).

        The result is a buffer that the next step overwrites: ``.clone()`` it to keep it.
        """
        if x.numel() != self._x.numel():
            raise ValueError(
                f"x must have input_size={self._x.numel()} values; got shape {tuple(x.shape)}"
            )
        if self._kernel is None:
            return self._torch_step(x.reshape(1, 1, -1))
        if x.dtype != self.dtype or x.device != self.device or not x.is_contiguous():
            self._x.copy_(x.reshape(-1))
            x = self._x
        if not self._kernel.refresh():
            raise RuntimeError(
                "the LSTM's weights changed device or dtype under this Stream; "
                "make a new Stream for the module as it is now"
            )
        self._kernel(x.data_ptr(), None, self.h, self.c, self.out)
        return self.out

    @torch.no_grad()
    def _torch_step(self, x: torch.Tensor) -> torch.Tensor:
        y, (h, c) = self.lstm(x.to(self.device, self.dtype), self.state)
        self.h.copy_(h[:, 0])
        self.c.copy_(c[:, 0])
        self.out.copy_(y.reshape(-1))
        return self.out


class LMStream:
    """One token at a time through a :class:`~glasslstm.LanguageModel`: ``step(token) ->
    logits`` (V,), a buffer the next step overwrites.

    With the C kernel, the first layer's input projection of every token (``E U_0 + b``) is
    computed once (when the table stays under ``table_limit`` values; else the embedding row is
    multiplied per step), and the output layer is one matrix-vector product into ``logits``.
    Dropout is off (inference). The model's weights are followed as :class:`Stream` does.
    """

    def __init__(self, model, state=None, table_limit: int = 4_000_000):
        from glasslstm.lstm import LSTM

        lstm = model.lstm
        self.model = model
        V = model.config.vocab_size
        w = model.head.weight
        self.logits = torch.empty(V, device=w.device, dtype=w.dtype)
        # Any other LSTM inside (a torch.nn.LSTM swapped in, say): the model's own forward.
        self.stream = (
            Stream(lstm, state) if isinstance(lstm, LSTM) and not lstm.bidirectional else None
        )
        self._state = state
        self._fused = self.stream is not None and self.stream.fused and w.dtype == self.stream.dtype
        if self._fused:
            suf = cpu.SUFFIX[self._s.dtype]
            self._linear = getattr(cpu.library(), f"glasslstm_linear_{suf}")
            self._use_table = V * 4 * lstm.hidden_size <= table_limit
            self._key: tuple | None = None
            self._extra = [
                t
                for t in (model.embedding.weight, model.head.weight, model.head.bias)
                if t is not None
            ]

    @property
    def _s(self) -> Stream:
        """The LSTM's fused Stream (only called where there is one)."""
        assert self.stream is not None
        return self.stream

    @property
    def state(self):
        return self._state if self.stream is None else self.stream.state

    def reset(self, state=None) -> None:
        if self.stream is None:
            self._state = state
        else:
            self.stream.reset(state)

    def _refresh(self) -> None:
        """Rebuild what is precomputed from the weights when any of them changed: the (V, 4H)
        table of every token's embedding through the first layer's U (bias included), and the
        output layer's transposed weight (the C matrix-vector product reads it by rows)."""
        k = self._s._kernel
        if not k.refresh():
            raise RuntimeError(
                "the model's weights changed device or dtype under this stream; "
                "make a new one (model.stream()) for the model as it is now"
            )
        key = (k._key, tuple(t._version for t in self._extra), self._extra[0].data_ptr())
        if key == self._key:
            return
        model = self.model
        if self._use_table:
            w_ih, _, b_ih, b_hh, _ = model.lstm._weights(0, 0)
            table = model.embedding.weight.detach() @ w_ih.detach().t()
            if b_ih is not None:
                table += (b_ih + b_hh).detach()
            self._table = table.contiguous()
        self._head_t = model.head.weight.detach().t().contiguous()
        self._head_b = None if model.head.bias is None else model.head.bias.detach()
        self._key = key

    def step(self, token: int) -> torch.Tensor:
        """Feed token id ``token``; return the logits of the next token (V,)."""
        V = self.logits.numel()
        if not 0 <= token < V:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{V - 1})")
        if not self._fused:
            return self._torch_step(token)
        s = self._s
        k = s._kernel
        self._refresh()
        if self._use_table:
            tab = self._table
            k(None, tab.data_ptr() + token * tab.stride(0) * tab.element_size(), s.h, s.c, s.out)
        else:
            emb = self.model.embedding.weight
            k(emb.data_ptr() + token * emb.stride(0) * emb.element_size(), None, s.h, s.c, s.out)
        W = self._head_t  # (P, V)
        self._linear(
            W.shape[1],
            W.shape[0],
            W.data_ptr(),
            None if self._head_b is None else self._head_b.data_ptr(),
            s.out.data_ptr(),
            self.logits.data_ptr(),
        )
        return self.logits

    @torch.no_grad()
    def _torch_step(self, token: int) -> torch.Tensor:
        model = self.model
        idx = torch.tensor([[token]], device=self.logits.device)
        if self.stream is None:
            logits, _, self._state = model(idx, self._state)
            self.logits.copy_(logits.reshape(-1))
        else:
            h = self.stream.step(model.embedding(idx).reshape(-1))
            self.logits.copy_(model.head(h))
        return self.logits

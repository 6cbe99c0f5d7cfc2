"""Streaming inference: one token at a time, the state kept, nothing allocated per step.

:class:`Stream` wraps a :class:`glasslstm.LSTM`; :class:`LMStream` a whole
:class:`~glasslstm.LanguageModel` (embedding -> LSTM -> output layer), which ``generate``,
``predict`` and the CLI use. On the CPU (float32/float64, the C++ operators loaded) each step is
a single operator call (``torch.ops.glasslstm.stream_step_``, :mod:`glasslstm.ops.step`): every
layer's matrix-vector products and gate math, written into buffers allocated once. Elsewhere
(CUDA; no operators) the same API runs the module's own forward under ``torch.no_grad()``.

Weights are read where they live, so a stream follows in-place updates (an optimizer step,
``load_state_dict``); sums it precomputes (``b_ih + b_hh``, a language model's embedding pushed
through the first layer's ``U``) are rebuilt when a parameter's version counter or storage
changes.

    >>> s = Stream(lstm)               # zero state
    >>> h = s.step(x_t)                # (input_size,) -> the top layer's H_t, (out,)
    >>> h_all, c_all = s.state         # (num_layers, 1, out) and (num_layers, 1, hidden)
"""

from __future__ import annotations

import torch

from glasslstm.lstm import LSTM
from glasslstm.ops.step import StepWeights, possible


def _check_lstm(lstm) -> None:
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
        self._kernel = StepWeights(lstm) if possible(lstm, self.device, self.dtype) else None
        if state is not None:
            self.reset(state)

    @property
    def fused(self) -> bool:
        """True when steps run in the C++ step (else in the module's torch forward)."""
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
        self._run(x, False)
        return self.out

    def _run(self, x: torch.Tensor, x_is_proj: bool) -> None:
        """One step of the C++ step on ``x`` (the input, or layer 0's x U^T + b), the weights'
        copies first brought up to date."""
        k = self._kernel
        assert k is not None
        if not k.refresh():
            raise RuntimeError(
                "the LSTM's weights changed device or dtype under this Stream; "
                "make a new Stream for the module as it is now"
            )
        self._launch(x, x_is_proj)

    def _launch(self, x: torch.Tensor, x_is_proj: bool) -> None:
        """:meth:`_run` for a caller that has just brought the copies up to date itself."""
        k = self._kernel
        assert k is not None
        k.stream_step(
            x,
            x_is_proj,
            self.h,
            self.c,
            self.out,
            k.weights,
            k.layout,
            k.work,
            k.flip(),
            k.weights8,
        )

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

    With the C++ step, the first layer's input projection of every token (``E U_0 + b``) is
    computed once (when the table stays under ``table_limit`` values; else the embedding row is
    multiplied per step), and the output layer is one matrix-vector product into ``logits``.
    Dropout is off (inference). The model's weights are followed as :class:`Stream` does.
    """

    def __init__(self, model, state=None, table_limit: int = 4_000_000):
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
        output layer's transposed weight (the C++ matrix-vector product reads it by rows)."""
        k = self._s._kernel
        assert k is not None
        if not k.refresh():
            raise RuntimeError(
                "the model's weights changed device or dtype under this stream; "
                "make a new one (model.stream()) for the model as it is now"
            )
        key = (k.builds, tuple(t._version for t in self._extra), self._extra[0].data_ptr())
        if key == self._key:
            return
        model = self.model
        if self._use_table:
            w_ih, _, b_ih, b_hh, _ = model.lstm._weights(0, 0)
            table = model.embedding.weight.detach() @ w_ih.detach().t()
            if b_ih is not None:
                table += (b_ih + b_hh).detach()
            self._table = table.contiguous()
        head = model.head.weight.detach()  # (V, P)
        self._head_scale = None
        if getattr(model, "quantized", None) == "int8" and head.dtype == torch.float32:
            from glasslstm.quantize import int8_rows

            q, self._head_scale = int8_rows(head)  # one scale per output (token)
            head = q
        self._head_t = head.t().contiguous()
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
        self._refresh()  # the LSTM's copies included
        if self._use_table:
            s._launch(self._table[token], True)
        else:
            s._launch(self.model.embedding.weight.detach()[token], False)
        torch.ops.glasslstm.linear_(
            self._head_t, self._head_b, s.out, self.logits, self._head_scale
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

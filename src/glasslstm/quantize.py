"""Weight-only int8 for inference: ``glasslstm.quantize.int8(model)``.

Every weight matrix of the LSTM and, for a :class:`~glasslstm.LanguageModel`, the output layer,
is rounded to int8 with one scale per output row (per channel: ``w ~ q * scale[:, None]``,
``scale = max |row| / 127``). A gate's row of ``weight_ih`` and of ``weight_hh`` share one scale
(they are one output channel of ``[U W] [x; h]``, which the step reads as one row); biases and
the embedding stay float32. The module keeps float32 weights holding exactly those rounded
values, so every path computes the quantized model; the one-token step (``Stream``,
``generate``, ``predict``, the drop-in ``lstm(x_t, (h, c))``) reads the int8 copy itself: a
quarter of the bytes per token, which is what a batch-1 step is bound by. Batched calls
(``lstm(x)`` over a sequence) run float32 products on the rounded values (same speed as
float32). What it costs and gains is measured in docs/benchmarks.md (``python -m
glasslstm.bench.quantize``).

No ``torch.ao.quantization`` (deprecated): this is a rounding of the weights plus the C++
step's int8 kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from glasslstm.errors import ConfigError

MODES = ("int8",)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 (rows, k), scale float32 (rows))`` with ``w ~ q * scale[:, None]``: each row's
    largest magnitude maps to 127 (a row of zeros gets scale 1)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _round_(*ps: torch.Tensor) -> None:
    """Round the matrices ``ps`` (same rows) in place, one scale per row across all of them."""
    q, scale = int8_rows(torch.cat(ps, 1))
    rounded = q.float() * scale[:, None]
    start = 0
    for p in ps:
        p.copy_(rounded[:, start : start + p.shape[1]])
        start += p.shape[1]


@torch.no_grad()
def int8(model: nn.Module) -> nn.Module:
    """Quantize ``model`` (a :class:`glasslstm.LSTM` or a :class:`~glasslstm.LanguageModel`)
    to weight-only int8, in place; returns it. Its weights must be float32."""
    from glasslstm.lstm import LSTM
    from glasslstm.model import LanguageModel

    target: LSTM | LanguageModel
    if isinstance(model, LanguageModel):
        target, lstm, extra = model, model.lstm, [model.head.weight]
    elif isinstance(model, LSTM):
        target, lstm, extra = model, model, []
    else:
        raise ConfigError(
            f"int8 quantization takes a glasslstm.LSTM or LanguageModel; got {type(model).__name__}"
        )
    if not isinstance(lstm, LSTM):
        raise ConfigError("int8 quantization needs glasslstm's LSTM inside the model")
    if lstm.weight_hh_l0.dtype != torch.float32:
        raise ConfigError(
            "int8 quantization starts from float32 weights; this model is "
            f"{lstm.weight_hh_l0.dtype} (convert it with .float() first)"
        )
    for layer in range(lstm.num_layers):
        for direction in range(lstm.num_directions):
            w_ih, w_hh, _, _, w_hr = lstm._weights(layer, direction)
            _round_(w_ih, w_hh)
            if w_hr is not None:
                _round_(w_hr)
    for w in extra:
        _round_(w)
    lstm.quantized = "int8"
    target.quantized = "int8"
    lstm.__dict__.pop("_drop_in", None)  # the drop-in call's copies: rebuilt as int8
    return model


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """``mode`` ("int8") applied to ``model`` in place; a clear error for anything else."""
    if mode not in MODES:
        raise ConfigError(f"--quantize {mode!r} is not supported; use one of {', '.join(MODES)}")
    return int8(model)

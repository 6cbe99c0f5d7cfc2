"""Weight-only int8 (glasslstm.quantize): the rounding, and the int8 step against the same
quantized model run by the float path."""

from __future__ import annotations

import copy

import pytest
import torch

import glasslstm
from glasslstm import quantize
from glasslstm.data import CharTokenizer
from glasslstm.errors import ConfigError
from glasslstm.model import LanguageModel, ModelConfig
from glasslstm.ops import native

needs_ops = pytest.mark.skipif(not native.available(), reason="the C++ step is not available")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def test_int8_rows_round_each_row_to_its_own_scale():
    w = torch.randn(9, 33) * torch.logspace(-3, 2, 9)[:, None]  # rows of very different sizes
    w[4] = 0.0
    q, scale = quantize.int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (9,)
    assert q.abs().amax(dim=1)[[0, 1, 2, 3, 5, 6, 7, 8]].eq(127).all()  # each row uses the range
    assert scale[4] == 1 and not q[4].any()
    err = (q.float() * scale[:, None] - w).abs().amax(dim=1)
    assert (err <= scale / 2 + 1e-6 * w.abs().amax(dim=1)).all()  # half a step at most


def test_quantized_module_holds_exactly_the_rounded_weights():
    lstm = glasslstm.LSTM(5, 7, num_layers=2, proj_size=3)
    before = {n: p.detach().clone() for n, p in lstm.named_parameters()}
    quantize.int8(lstm)
    assert lstm.quantized == "int8"
    for name, p in lstm.named_parameters():
        if name.startswith("bias"):
            assert torch.equal(p, before[name])  # biases stay float32
    for sfx in ("_l0", "_l1"):  # a gate row of U and of W: one output channel, one scale
        uw = torch.cat([before["weight_ih" + sfx], before["weight_hh" + sfx]], 1)
        q, scale = quantize.int8_rows(uw)
        got = torch.cat([getattr(lstm, "weight_ih" + sfx), getattr(lstm, "weight_hh" + sfx)], 1)
        assert torch.equal(got, q.float() * scale[:, None])
        q, scale = quantize.int8_rows(before["weight_hr" + sfx])
        assert torch.equal(getattr(lstm, "weight_hr" + sfx), q.float() * scale[:, None])


@needs_ops
@pytest.mark.parametrize(
    "cfg", [dict(num_layers=2), dict(num_layers=2, proj_size=5), dict(hidden_size=300)]
)
def test_the_int8_step_computes_the_quantized_model(cfg):
    """Stream and the drop-in call read int8 panels; the batched forward multiplies the same
    rounded values in float32: the same numbers up to float32 summation order."""
    cfg = {"input_size": 6, "hidden_size": 12, **cfg}
    lstm = quantize.int8(glasslstm.LSTM(**cfg))
    x = torch.randn(9, 1, 6)
    with torch.no_grad():
        want = lstm(x)[0][:, 0]  # the sequence path: float32 products
        stream = glasslstm.Stream(lstm)
        got = torch.stack([stream.step(x[t, 0]).clone() for t in range(9)])
        one = lstm(x[:1])[0][0, 0]  # the drop-in one-token call
    assert stream._kernel is not None and stream._kernel.weights8 is not None
    assert rel_err(got, want) <= 1e-5 and rel_err(one, want[0]) <= 1e-5


@needs_ops
def test_a_quantized_language_model_streams_its_quantized_logits():
    tok = CharTokenizer(list("abc ."))
    model = LanguageModel(ModelConfig(vocab_size=5, hidden_size=16, num_layers=2), tok).eval()
    float_model = copy.deepcopy(model)
    quantize.int8(model)
    assert model.quantized == "int8" and not torch.equal(model.head.weight, float_model.head.weight)
    ids = [0, 3, 1, 1, 4, 2]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0]
    s = model.stream()
    got = torch.stack([s.step(i).clone() for i in ids])
    assert s._head_scale is not None  # the output layer streamed from int8 too
    assert rel_err(got, want) <= 1e-5
    text = "".join(model.generate("ab", 20, temperature=0.0))
    assert len(text) >= 20


def test_what_cannot_be_quantized_says_why():
    with pytest.raises(ConfigError, match="float32"):
        quantize.int8(glasslstm.LSTM(2, 3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="LSTM or LanguageModel"):
        quantize.int8(torch.nn.Linear(2, 3))
    with pytest.raises(ConfigError, match="int4.*int8"):
        quantize.quantize(glasslstm.LSTM(2, 3), "int4")

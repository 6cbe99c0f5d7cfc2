"""LanguageModel: the softmax over H_t, generation, prediction, bpc/perplexity by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glasslstm.data import ByteTokenizer, CharTokenizer, DataError
from glasslstm.model import ConfigError, LanguageModel, ModelConfig
from glasslstm.trainer import evaluate

TEXT = "hello glass lstm. the cell keeps bob in mind. " * 8


def char_model(text=TEXT, **kw) -> LanguageModel:
    tok = CharTokenizer(sorted(set(text)))
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, **{"hidden_size": 32, "num_layers": 1, "dropout": 0.0, **kw}
    )
    return LanguageModel(cfg, tok)


def test_forward_shapes_and_loss_is_cross_entropy():
    model = char_model(num_layers=2, dropout=0.0)
    idx = torch.randint(0, model.config.vocab_size, (3, 7))
    tgt = torch.randint(0, model.config.vocab_size, (3, 7))
    logits, loss, (h, c) = model(idx, targets=tgt)
    assert logits.shape == (3, 7, model.config.vocab_size)
    assert h.shape == c.shape == (2, 3, 32)
    by_hand = -torch.log_softmax(logits, -1).gather(-1, tgt.unsqueeze(-1)).mean()
    assert torch.allclose(loss, by_hand)
    assert model(idx)[1] is None


def test_state_carries_across_calls():
    """Two halves with the state carried == the whole sequence at once (truncated BPTT's basis)."""
    model = char_model(num_layers=2).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 10))
    whole, _, _ = model(idx)
    first, _, state = model(idx[:, :4])
    second, _, _ = model(idx[:, 4:], state)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-6)


@pytest.mark.slow
def test_overfits_a_tiny_text_to_near_zero_loss():
    torch.manual_seed(0)
    text = "the brave bob served in the navy. "
    model = char_model(text, hidden_size=64)
    ids = torch.tensor(model.tokenizer.encode(text * 4))
    x, y = ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        _, loss, _ = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    _, final_loss, _ = model(x, targets=y)
    assert final_loss.item() < 0.05


def test_bpc_and_perplexity_match_a_hand_computation():
    """A model whose softmax is a fixed distribution: loss is -mean log p(next) by hand."""
    tok = CharTokenizer("abcd")
    model = LanguageModel(ModelConfig(vocab_size=4, hidden_size=4, num_layers=1, dropout=0.0), tok)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(p.log())
    ids = np.array(tok.encode("abcdddcba"))
    res = evaluate(model, ids, batch_size=1, seq_len=3)
    targets = "bcdddcba"  # every char but the first is predicted once
    nats = -sum(math.log([0.1, 0.2, 0.3, 0.4]["abcd".index(ch)]) for ch in targets) / len(targets)
    assert res["tokens"] == len(targets)
    assert res["loss"] == pytest.approx(nats, rel=1e-6)
    assert res["bpc"] == pytest.approx(nats / math.log(2), rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(nats), rel=1e-6)
    # bits per character for a multi-character token: the same nats spread over more chars
    res2 = evaluate(model, ids, batch_size=1, seq_len=3, chars_per_token=2.0)
    assert res2["bpc"] == pytest.approx(nats / math.log(2) / 2, rel=1e-6)


def test_temperature_zero_is_the_argmax_chain_and_seeds_reproduce():
    model = char_model()
    greedy = "".join(model.generate("bob", 20, temperature=0))
    assert greedy == "".join(model.generate("bob", 20, temperature=0.7, top_k=1, seed=5))
    assert greedy == "".join(model.generate("bob", 20, temperature=1.0, top_p=1e-6, seed=9))
    # argmax by hand, one step at a time
    ids = model.tokenizer.encode("bob")
    logits, _, state = model(torch.tensor([ids]))
    expected = []
    for _ in range(20):
        nxt = int(logits[0, -1].argmax())
        expected.append(nxt)
        logits, _, state = model(torch.tensor([[nxt]]), state)
    assert greedy == model.tokenizer.decode(expected)
    a = "".join(model.generate("bob", 30, temperature=1.0, seed=3))
    assert a == "".join(model.generate("bob", 30, temperature=1.0, seed=3))
    assert len(a) == 30


def test_top_k_only_ever_picks_among_the_k_most_likely():
    model = char_model()
    ids = model.tokenizer.encode("the cell")
    logits = model(torch.tensor([ids]))[0][0, -1]
    allowed = {model.tokenizer.decode([i]) for i in logits.topk(2).indices.tolist()}
    firsts = {
        next(model.generate("the cell", 1, temperature=5.0, top_k=2, seed=s)) for s in range(40)
    }
    assert firsts <= allowed and len(firsts) == 2


def test_predict_next_is_the_softmax():
    model = char_model()
    preds = model.predict_next("hello glass", top=5)
    ids = model.tokenizer.encode("hello glass")
    probs = torch.softmax(model(torch.tensor([ids]))[0][0, -1], -1)
    top = probs.topk(5)
    assert [p.prob for p in preds] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert [p.text for p in preds] == [model.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert all(a.prob >= b.prob for a, b in zip(preds, preds[1:]))


def test_prompt_characters_not_in_the_vocabulary_are_a_clear_error():
    model = char_model()
    with pytest.raises(DataError, match=r"not in the vocabulary: 'Z', 'é'"):
        model.predict_next("Zoé")
    with pytest.raises(DataError, match="not in the vocabulary"):
        next(model.generate("Zoé", 5))


def test_byte_model_streams_valid_text():
    model = LanguageModel(
        ModelConfig(vocab_size=256, hidden_size=16, num_layers=1), ByteTokenizer()
    )
    out = "".join(model.generate("naïve ☃", 50, temperature=1.5, seed=0))
    assert out and out.encode("utf-8")  # strict: no lone surrogates, split characters replaced


def test_weight_tying_shares_the_embedding():
    model = char_model(tie_weights=True)
    assert model.head.weight is model.embedding.weight
    with pytest.raises(ConfigError, match="tie_weights needs embed_size"):
        ModelConfig(vocab_size=5, hidden_size=8, embed_size=4, tie_weights=True)


def test_sampling_options_are_checked():
    model = char_model()
    for kw, match in [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ConfigError, match=match):
            next(model.generate("bob", 3, **kw))


def test_continuation_prob_is_the_product_of_next_token_probabilities():
    model = char_model()
    p = model.continuation_prob("the cell", " keeps")
    by_hand, text = 1.0, "the cell"
    for ch in " keeps":
        probs = torch.softmax(model(torch.tensor([model.tokenizer.encode(text)]))[0][0, -1], -1)
        by_hand *= probs[model.tokenizer.encode(ch)[0]].item()
        text += ch
    assert p == pytest.approx(by_hand, rel=1e-5)
    assert model.continuation_prob("the cell", "") == 1.0


def test_next_word_follows_the_argmax_chain():
    model = char_model()
    word, prob = model.next_word("the cell")
    greedy = "".join(model.generate("the cell", 12, temperature=0))
    assert greedy.lstrip().startswith(word)
    assert 0 < prob <= 1


# --------------------------------------------------------------------------- the other cores


def test_rnn_core_is_a_vanilla_rnn_with_a_one_tensor_state():
    model = char_model(cell="rnn", num_layers=2).eval()
    assert type(model.lstm).__name__ == "RNN" and model.lstm.num_layers == 2
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    whole, _, state = model(idx)
    assert isinstance(state, tuple) and len(state) == 1 and state[0].shape == (2, 2, 32)
    first, _, mid = model(idx[:, :5])
    second, _, _ = model(idx[:, 5:], mid)  # the state carries like the LSTM's
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-6)
    # the recurrence is h' = tanh(x W_ih^T + h W_hh^T + b): torch's own RNN cell, by hand
    rnn = model.lstm
    x = model.embedding(idx[:1, :2])[0]  # (2, 32): two steps of one sequence
    w_ih, w_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
    h1 = torch.tanh(x[0] @ w_ih.T + b_ih + b_hh)
    h2 = torch.tanh(x[1] @ w_ih.T + h1 @ w_hh.T + b_ih + b_hh)
    first_layer = torch.nn.RNN(32, 32, batch_first=True)
    first_layer.load_state_dict(
        {k: getattr(rnn, k) for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")}
    )
    out = first_layer(x.unsqueeze(0))[0][0]
    assert torch.allclose(out, torch.stack([h1, h2]), atol=1e-6)
    text = "".join(model.generate("hello", 12, temperature=0))  # streams through the RNN too
    assert len(text) == 12


def test_weighted_loss_is_the_weighted_mean_cross_entropy():
    model = char_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 6))
    tgt = torch.randint(0, model.config.vocab_size, (2, 6))
    w = torch.ones(2, 6)
    w[0, 3] = 50.0
    logits, loss, _ = model(idx, targets=tgt, weights=w)
    ce = -torch.log_softmax(logits, -1).gather(-1, tgt.unsqueeze(-1))[..., 0]
    assert torch.allclose(loss, (ce * w).sum() / w.sum())
    assert torch.allclose(model(idx, targets=tgt, weights=torch.ones(2, 6))[1], ce.mean())


def test_chrono_init_spreads_the_forget_biases():
    torch.manual_seed(0)
    model = char_model(chrono_init=64, hidden_size=256)
    H = 256
    b_f = model.lstm.bias_ih_l0[H : 2 * H] + model.lstm.bias_hh_l0[H : 2 * H]
    b_i = model.lstm.bias_ih_l0[:H] + model.lstm.bias_hh_l0[:H]
    assert torch.allclose(b_i, -b_f)  # input bias the negative of the forget bias
    u = b_f.exp()  # log U[1, 63]
    assert u.min() >= 1 and u.max() <= 63 and u.max() > 40 and u.min() < 5
    plain = char_model(forget_bias=1.0)  # without it, forget_bias acts
    assert (plain.lstm.bias_ih_l0[32:64] > 1 - 1 / math.sqrt(32) - 1e-6).all()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"cell": "gru"}, "cell='gru' is not valid; expected one of lstm, rnn"),
        ({"chrono_init": 1}, "chrono_init=1 is not valid.*the longest dependency in tokens, >= 2"),
        ({"chrono_init": -3}, "chrono_init=-3 is not valid; expected an int >= 0"),
        ({"cell": "rnn", "chrono_init": 8}, "LSTM options"),
        ({"cell": "rnn", "proj_size": 8}, "LSTM options"),
    ],
)
def test_bad_core_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(vocab_size=5, **kw)

"""LSTM(checkpoint=S): the same results and gradients as without, in far less memory."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import glasslstm
from glasslstm.cli import main
from glasslstm.model import ConfigError, LanguageModel, ModelConfig
from glasslstm.ops.recompute import checkpointed
from glasslstm.trainer import TrainConfig

BACKENDS = ["fused", "bptt", "loop"]
F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def twins(segment: int, backend: str, **kw):
    """Two LSTMs with the same weights: without and with checkpointing."""
    plain = glasslstm.LSTM(dtype=F64, backend=backend, **kw)
    ckpt = glasslstm.LSTM(dtype=F64, backend=backend, checkpoint=segment, **kw)
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def run(model, x, hx=None, **kw):
    """Forward + backward through output, h_n and c_n; values, gradients and the trace."""
    x = x.detach().clone().requires_grad_(True)
    if hx is not None:
        hx = tuple(t.detach().clone().requires_grad_(True) for t in hx)
    out, (h_n, c_n), trace = model(x, hx, return_gates=True, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = sum(
        (t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).sum()
        for t in (out, h_n, c_n)
    )
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads["input"] = x.grad
    if hx is not None:
        grads["h_0"], grads["c_0"] = hx[0].grad, hx[1].grad
    values = {
        "output": out,
        "h_n": h_n,
        "c_n": c_n,
        **{f"trace.{k}": v for k, v in trace.values.items()},
    }
    return values, grads


def assert_same(a, b, tol=1e-10):
    for part_a, part_b in zip(a, b):
        assert part_a.keys() == part_b.keys()
        for name in part_a:
            assert part_a[name].shape == part_b[name].shape, name
            err = rel_err(part_a[name], part_b[name])
            assert err <= tol, f"{name}: {err:.3g} > {tol}"


CASES = [  # (T, segment, lengths, LSTM kwargs)
    (12, 4, None, dict(num_layers=2)),  # S divides T
    (11, 4, None, dict(num_layers=2)),  # ... and does not
    (11, 1, None, dict(num_layers=1)),  # one step per segment
    (9, 9, None, dict(num_layers=2)),  # S == T: plain path
    (9, 50, None, dict(num_layers=2)),  # S > T
    (11, 3, [11, 4, 7, 1, 9], dict(num_layers=2, bidirectional=True)),  # ragged, unsorted
    (10, 3, [10, 2, 6], dict(num_layers=2, proj_size=2)),
    (
        10,
        4,
        [7, 3, 5],
        dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True),
    ),  # longest < T
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize(
    "T,segment,lengths,kw",
    CASES,
    ids=[
        "divides",
        "remainder",
        "S1",
        "S=T",
        "S>T",
        "ragged-bi",
        "ragged-proj",
        "bi-proj-bf-short",
    ],
)
def test_gradients_equal_without_checkpointing(T, segment, lengths, kw, with_hx, backend):
    plain, ckpt = twins(segment, backend, input_size=3, hidden_size=5, **kw)
    B = len(lengths) if lengths else 4
    x = torch.randn((B, T, 3) if kw.get("batch_first") else (T, B, 3), dtype=F64)
    hx = None
    if with_hx:
        LD = plain.num_layers * plain.num_directions
        hx = (torch.randn(LD, B, plain.out_size, dtype=F64), torch.randn(LD, B, 5, dtype=F64))
    assert_same(run(ckpt, x, hx, lengths=lengths), run(plain, x, hx, lengths=lengths))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequence_with_checkpointing(backend):
    plain, ckpt = twins(2, backend, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(7, 4, 3, dtype=F64)
    lengths = torch.tensor([3, 7, 1, 5])

    def packed_run(model):
        xg = x.clone().requires_grad_(True)
        out, (h_n, c_n) = model(pack_padded_sequence(xg, lengths, enforce_sorted=False))
        padded, _ = pad_packed_sequence(out)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=F64).view_as(padded)).sum()
        model.zero_grad()
        (loss + h_n.sum() + (c_n**2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return {"output": padded, "h_n": h_n, "c_n": c_n}, {**grads, "input": xg.grad}

    assert_same(packed_run(ckpt), packed_run(plain))


def test_checkpointing_is_skipped_without_gradients():
    """Inference has no backward to save memory for: one plain pass, the same numbers."""
    calls = []

    def layer(x, state, params, batch_sizes, extras):
        calls.append((x.shape[0], extras))
        return x * params[0], *state

    x, s, w = torch.randn(10, 2, 3), (torch.zeros(2, 3),), (torch.tensor(2.0),)
    with torch.no_grad():
        y, _ = checkpointed(layer, 3, x, s, w, None, False, True)
    assert calls == [(10, True)] and torch.equal(y, x * 2)
    calls.clear()
    y, _ = checkpointed(layer, 3, x.requires_grad_(), s, w, None, False, True)
    assert calls == [(3, True), (3, True), (3, True), (1, True)] and torch.equal(y, x * 2)
    calls.clear()
    y.sum().backward()  # recomputed, last segment first, no extras
    assert calls == [(1, False), (3, False), (3, False), (3, False)]
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_reverse_segments_run_last_first_and_hand_the_state_back():
    """A layer that counts the steps it has seen: the count must run through the segments."""
    order = []

    def layer(x, state, params, batch_sizes, extras):
        order.append(x[0, 0, 0].item())
        return x * params[0] + state[0], state[0] + x.shape[0]

    x = torch.arange(7.0).view(7, 1, 1).requires_grad_()
    w = torch.tensor(1.0, requires_grad=True)
    y, n = checkpointed(layer, 3, x, (torch.zeros(1, 1),), (w,), None, True, False)
    assert order == [6.0, 3.0, 0.0]  # segments [6], [3..5], [0..2]
    assert n.item() == 7.0
    assert y.view(-1).tolist() == [4, 5, 6, 4, 5, 6, 6]  # each segment: x + steps seen before
    y.sum().backward()
    assert order[3:] == [0.0, 3.0, 6.0]  # backward: the reverse of forward's order
    assert w.grad.item() == 21.0 and torch.equal(x.grad, torch.ones_like(x))


def test_double_backward_is_refused_not_wrong():
    lstm = glasslstm.LSTM(2, 3, dtype=F64, backend="loop", checkpoint=2)
    x = torch.randn(5, 1, 2, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad((lstm(x)[0] ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def _allocator_peak(fn) -> tuple[int, int]:
    """(peak, net) bytes allocated by torch's CPU allocator while ``fn`` runs.

    torch's profiler records every allocation and free (``profile_memory``); the running sum
    over them, in time order, is the live memory above what existed before ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live


@pytest.mark.slow
def test_checkpointing_keeps_far_less_memory_for_backward():
    """T = 2000: what forward leaves alive for backward, and the peak over forward + backward,
    both measured at torch's allocator."""
    T, B, H, S = 2000, 4, 32, 50
    x = torch.randn(T, B, 4, dtype=F64)
    measured = {}
    for segment in (0, S):
        lstm = glasslstm.LSTM(4, H, dtype=F64, backend="bptt", checkpoint=segment)
        box = {}

        def forward(lstm=lstm, box=box):
            box["out"] = lstm(x)[0]

        def backward(box=box):
            box.pop("out").sum().backward()

        kept, after_forward = _allocator_peak(forward)
        during_backward, _ = _allocator_peak(backward)
        measured[segment] = (after_forward, max(kept, after_forward + during_backward))
    (kept_plain, peak_plain), (kept_ckpt, peak_ckpt) = measured[0], measured[S]
    # Without: gates, h, c, tanh(c) and the output of every step (8H per row and step).
    assert kept_plain >= 8 * H * T * B * 8
    # With: the output and 40 segment boundaries (h, c).
    assert kept_ckpt < kept_plain / 4
    assert kept_ckpt <= (H * T * B + 2 * H * B * (T // S + 1)) * 8 * 1.1
    assert peak_ckpt < peak_plain / 4


def test_checkpoint_argument_is_checked_and_shown():
    assert "checkpoint=64" in repr(glasslstm.LSTM(2, 3, checkpoint=64))
    assert "checkpoint" not in repr(glasslstm.LSTM(2, 3))
    with pytest.raises(ValueError, match="checkpoint must be >= 0"):
        glasslstm.LSTM(2, 3, checkpoint=-1)
    with pytest.raises(TypeError, match="checkpoint must be an int"):
        glasslstm.LSTM(2, 3, checkpoint=2.5)


def test_language_model_and_train_config_pass_it_on():
    model = LanguageModel(ModelConfig(vocab_size=7, hidden_size=8, num_layers=1, checkpoint=16))
    assert model.lstm.checkpoint == 16
    assert TrainConfig(checkpoint=256).model_config(7).checkpoint == 256
    # config.json of runs from before the option: no key, checkpointing off
    old = {
        "vocab_size": 7,
        "hidden_size": 8,
        "num_layers": 1,
        "dropout": 0.1,
        "embed_size": 0,
        "tie_weights": False,
        "forget_bias": 1.0,
        "proj_size": 0,
    }
    assert ModelConfig.from_dict(old).checkpoint == 0
    assert TrainConfig.from_dict({"hidden": 8}).checkpoint == 0
    with pytest.raises(ConfigError, match="checkpoint"):
        ModelConfig(vocab_size=7, checkpoint=-3)
    with pytest.raises(ConfigError, match="--checkpoint"):
        TrainConfig(checkpoint=-1)


@pytest.mark.slow
def test_train_cli_with_checkpoint(tmp_path, capsys):
    """`glasslstm train --checkpoint 5`: recorded in the run, and learns like without."""
    text = tmp_path / "text.txt"
    text.write_text("Bob is a nice person. Dan, on the other hand, is evil. " * 40)
    common = [
        "--data",
        str(text),
        "--hidden",
        "16",
        "--layers",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--eval-every",
        "4",
        "--warmup",
        "1",
        "--dropout",
        "0",
        "--json",
    ]
    assert main(["train", *common, "--checkpoint", "5", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    a = LanguageModel.load(tmp_path / "a", which="last")
    b = LanguageModel.load(tmp_path / "b", which="last")
    assert a.config.checkpoint == 5 and a.lstm.checkpoint == 5 and b.config.checkpoint == 0
    sa, sb = a.state_dict(), b.state_dict()
    for name in sa:  # the same training up to float32 rounding of the regrouped sums
        assert torch.allclose(sa[name], sb[name], atol=1e-5), name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_gradients_equal_without_checkpointing(backend):
    if backend == "fused":
        pytest.importorskip("triton")  # the fused path on CUDA is the Triton cell
    plain, ckpt = twins(
        3, backend, input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2
    )
    plain, ckpt = plain.cuda(), ckpt.cuda()
    x = torch.randn(11, 4, 3, dtype=F64, device="cuda")
    lengths = [11, 3, 8, 6]

    def go(model):
        values, grads = run(model, x, lengths=lengths)
        return ({k: v.cpu() for k, v in values.items()}, {k: v.cpu() for k, v in grads.items()})

    assert_same(go(ckpt), go(plain))


@pytest.mark.gpu
def test_cuda_checkpointing_lowers_peak_memory():
    T, B, H = 2000, 16, 128
    x = torch.randn(T, B, H, device="cuda")
    peaks = {}
    for segment in (0, 45):
        lstm = glasslstm.LSTM(H, H, backend="bptt", checkpoint=segment, device="cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        lstm(x)[0].sum().backward()
        torch.cuda.synchronize()
        peaks[segment] = torch.cuda.max_memory_allocated() - base
    assert peaks[45] < peaks[0] / 4

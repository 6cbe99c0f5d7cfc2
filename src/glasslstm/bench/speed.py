"""`glasslstm bench speed`: glasslstm against torch.nn.LSTM (oneDNN on the CPU, cuDNN on a GPU)
in the same run, on what users do with an LSTM.

Sections (each contender timed alternately with its peer inside every repetition; medians):

* ``train``    forward + backward of one layer, T x B x H with I = H: torch.nn.LSTM,
               glasslstm.LSTM (default backend), glasslstm with ``return_gates=True``; on CUDA
               also the CUDA-graphed fused module (:func:`glasslstm.ops.graphs.graphed`); on the
               CPU, when ``jax`` is installed, a jitted ``lax.scan`` LSTM (XLA) with the same
               weights — the other peer (checked against torch.nn.LSTM's output first).
               GFLOP/s and the fraction of this machine's float32 GEMM peak: the best rate of
               the GEMM implementations measured here (torch.mm, oneDNN's matmul, glasslstm's
               blocked oneDNN micro-kernel; :func:`glasslstm.bench.timing.gemm_peak`).
* ``train_bf16`` the same forward + backward under ``torch.autocast(dtype=torch.bfloat16)``:
               torch.nn.LSTM runs oneDNN's (cuDNN's) bf16 RNN; glasslstm keeps its state and
               gate math in float32 with bf16 matrix products on the CPU (and on a GPU runs
               wholly in float32). No GFLOP/s: the peak measured is float32's.
* ``infer``    forward only under ``torch.no_grad()`` (and the jitted JAX forward).
* ``step``     one token of one sequence (batch 1), state carried: torch.nn.LSTM called as
               ``lstm(x_t, (h, c))``, glasslstm called the same way (drop-in), and
               :class:`glasslstm.Stream`'s ``step``.
* ``generate`` tokens/s of a char language model (``--gen-layers`` x ``--gen-hidden``, 65
               tokens), glasslstm's ``generate`` against the same model with torch.nn.LSTM inside.

Ratios are ``peer time / our time``: above 1 means glasslstm is faster (for the JAX rows:
torch.nn.LSTM's time / JAX's time). torch.nn.LSTM and JAX appear here only as peers (glasslstm's
copies are built with ``from_torch``); nothing of glasslstm computes with them.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

import glasslstm
from glasslstm.bench.timing import gemm_peak, machine_info, sync, time_once


def _alternate(fns: dict, reps: int, device) -> dict:
    """Median seconds per contender, and each contender's median per-repetition ratio to the
    first (the peer); the order rotates every repetition."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(time_once(fns[n], device))
    peer = names[0]
    return {
        n: {
            "ms": statistics.median(times[n]) * 1e3,
            "speedup": statistics.median(p / t for p, t in zip(times[peer], times[n])),
        }
        for n in names
    }


def _mean_us(fn, n: int, device) -> float:
    """Mean microseconds per call over ``n`` calls (for calls too short to time singly)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n * 1e6


def _jax_peer(peer: torch.nn.LSTM, x: torch.Tensor, dy: torch.Tensor):
    """``(train, infer)`` callables of a jitted JAX ``lax.scan`` LSTM with ``peer``'s weights
    on ``x`` (T, B, I) — train: gradients of sum(y * dy) w.r.t. the weights and x — or None
    when jax is not installed. The input projection is one matrix product over all steps, as
    in glasslstm and torch. Raises if its output differs from ``peer``'s."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None

    def as_jax(t):
        return jnp.asarray(t.detach().cpu().numpy())

    w_ih, w_hh, b_ih, b_hh = (
        getattr(peer, n) for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    )
    params = (as_jax(w_ih), as_jax(w_hh), as_jax(b_ih + b_hh))
    xj, dyj = as_jax(x), as_jax(dy)

    def lstm(params, xs):
        w_ih, w_hh, b = params
        B, H = xs.shape[1], w_hh.shape[1]

        def cell(state, a):
            h, c = state
            i, f, g, o = jnp.split(a + h @ w_hh.T, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((B, H), xs.dtype)
        return jax.lax.scan(cell, (zeros, zeros), xs @ w_ih.T + b)[1]

    grads = jax.jit(jax.grad(lambda p, xs: jnp.sum(lstm(p, xs) * dyj), argnums=(0, 1)))
    forward = jax.jit(lstm)
    with torch.no_grad():
        want = peer(x)[0].cpu().numpy()
    got = jax.device_get(forward(params, xj))
    err = float(abs(got - want).max())
    if err > 1e-4:
        raise RuntimeError(f"the JAX peer disagrees with torch.nn.LSTM (max error {err:.2e})")
    return (
        lambda: jax.block_until_ready(grads(params, xj)),
        lambda: jax.block_until_ready(forward(params, xj)),
    )


def bench_train(H: int, T: int, B: int, reps: int, device, peak: float, bf16: bool = False) -> dict:
    """``bf16``: under bfloat16 autocast (no graphed or JAX contender, no GFLOP/s)."""
    torch.manual_seed(0)
    peer = torch.nn.LSTM(H, H).to(device)
    ours = glasslstm.LSTM.from_torch(peer)
    x = torch.randn(T, B, H, device=device, requires_grad=True)
    dy = torch.randn(T, B, H, device=device)

    def step(model, gates=False, autocast=bf16):
        def run():
            x.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(x, return_gates=True)[0] if gates else model(x)[0]
            out.backward(dy.to(out.dtype))

        return run

    fns = {
        "torch.nn.LSTM": step(peer),
        "glasslstm": step(ours),
        "glasslstm+gates": step(ours, gates=True),
    }
    if device.type == "cuda" and not bf16:
        from glasslstm.ops import graphs

        fused = glasslstm.LSTM.from_torch(peer, backend="fused")
        fns["glasslstm graphed"] = step(graphs.graphed(fused, (x,)))
    elif not bf16:
        jax_fns = _jax_peer(peer, x, dy)
        if jax_fns is not None:
            fns["JAX lax.scan (jit)"] = jax_fns[0]
    peer_note = None
    if bf16:
        try:
            fns["torch.nn.LSTM"]()
        except RuntimeError:  # oneDNN has no bf16 LSTM for this CPU (seen without AVX-512)
            fns["torch.nn.LSTM"] = step(peer, autocast=False)
            peer_note = "float32: its bf16 LSTM does not run on this CPU"
    for fn in fns.values():  # warm up (and build kernels / graphs / XLA programs)
        fn()
    res = _alternate(fns, reps, device)
    if bf16:
        if peer_note:
            res["torch.nn.LSTM"]["note"] = peer_note
        return res
    flops = 3.0 * 2.0 * T * B * 4 * H * (2 * H)
    for r in res.values():
        r["gflops"] = flops / (r["ms"] / 1e3) / 1e9
        r["of_peak"] = r["gflops"] / peak
    return res


def bench_infer(H: int, T: int, B: int, reps: int, device) -> dict:
    torch.manual_seed(0)
    peer = torch.nn.LSTM(H, H).to(device)
    ours = glasslstm.LSTM.from_torch(peer)
    x = torch.randn(T, B, H, device=device)
    with torch.no_grad():
        fns = {"torch.nn.LSTM": lambda: peer(x), "glasslstm": lambda: ours(x)}
        jax_fns = _jax_peer(peer, x, torch.zeros_like(x[..., :H])) if device.type == "cpu" else None
        if jax_fns is not None:
            fns["JAX lax.scan (jit)"] = jax_fns[1]
        for fn in fns.values():
            fn()
        return _alternate(fns, reps, device)


def bench_step(H: int, calls: int, device) -> dict:
    torch.manual_seed(0)
    peer = torch.nn.LSTM(H, H).to(device)
    ours = glasslstm.LSTM.from_torch(peer)
    x = torch.randn(1, 1, H, device=device)
    hx = (torch.zeros(1, 1, H, device=device), torch.zeros(1, 1, H, device=device))
    stream = glasslstm.Stream(ours)
    xv = x.reshape(-1)
    res: dict[str, Any] = {}
    with torch.no_grad():
        for _ in range(2):  # two rounds, keep the better: calls this short are easily disturbed
            for name, fn in (
                ("torch.nn.LSTM", lambda: peer(x, hx)),
                ("glasslstm", lambda: ours(x, hx)),
                ("glasslstm Stream", lambda: stream.step(xv)),
            ):
                us = _mean_us(fn, calls, device)
                res[name] = min(res.get(name, us), us)
    out = {n: {"us": us, "speedup": res["torch.nn.LSTM"] / us} for n, us in res.items()}
    out["glasslstm Stream"]["fused"] = stream.fused
    return out


def bench_generate(layers: int, hidden: int, tokens: int, device) -> dict:
    from glasslstm.data import CharTokenizer
    from glasslstm.model import LanguageModel, ModelConfig

    chars = [chr(c) for c in range(32, 97)]  # 65 tokens, like shakespeare
    tok = CharTokenizer(chars)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_layers=layers)
    ours = LanguageModel(cfg, tok).to(device).eval()
    peer = LanguageModel(cfg, tok).to(device).eval()
    peer.load_state_dict(ours.state_dict())
    peer.lstm = ours.lstm.to_torch()  # type: ignore[assignment]  # same weights, torch inside
    res: dict[str, Any] = {}
    for _ in range(2):
        for name, model in (("torch.nn.LSTM", peer), ("glasslstm", ours)):
            sync(device)
            start = time.perf_counter()
            n = sum(1 for _ in model.generate("A", length=tokens, temperature=1.0, seed=0))
            sync(device)
            rate = n / (time.perf_counter() - start)
            res[name] = max(res.get(name, 0.0), rate)
    return {n: {"tokens_per_s": r, "speedup": r / res["torch.nn.LSTM"]} for n, r in res.items()}


def speed_bench(
    sizes=(128, 512, 1024),
    T: int = 100,
    B: int = 32,
    reps: int = 5,
    device: str = "cpu",
    step_calls: int = 2000,
    gen_tokens: int = 300,
    gen_layers: int = 2,
    gen_hidden: int = 512,
    progress=print,
) -> dict:
    """Run every section; returns a JSON-ready dict (see the module docstring)."""
    dev = torch.device(device)
    peak_info = gemm_peak(dev)
    peak = peak_info["gflops"]
    out: dict[str, Any] = {
        "machine": machine_info(dev),
        "gemm_peak": peak_info,
        "backend": glasslstm.ops.describe(None, device),
        "gemm": {H: glasslstm.ops.gemm.describe(B, H) for H in sizes} if dev.type == "cpu" else {},
        "T": T,
        "B": B,
        "train": {},
        "train_bf16": {},
        "infer": {},
        "step": {},
    }
    for H in sizes:
        progress(f"train H={H} ...")
        out["train"][H] = bench_train(H, T, B, reps, dev, peak)
        progress(f"train, bf16 autocast, H={H} ...")
        out["train_bf16"][H] = bench_train(H, T, B, reps, dev, peak, bf16=True)
        progress(f"infer H={H} ...")
        out["infer"][H] = bench_infer(H, T, B, reps, dev)
        progress(f"step H={H} ...")
        out["step"][H] = bench_step(H, step_calls if H <= 512 else max(step_calls // 10, 20), dev)
    progress(f"generate {gen_layers}x{gen_hidden} ...")
    out["generate"] = bench_generate(gen_layers, gen_hidden, gen_tokens, dev)
    out["generate"]["model"] = f"{gen_layers}x{gen_hidden} char LM, 65 tokens"
    return out


def speed_table(res: dict) -> str:
    """The figures as markdown tables."""
    lines = [
        f"CPU: {res['machine'].get('cpu')} ({res['machine'].get('cpu_flags', '')}), "
        f"{res['machine'].get('threads')} threads",
        *(f"H={H}: {g}" for H, g in res.get("gemm", {}).items()),
        f"backend: {res['backend']}; GEMM peak {res['gemm_peak']['gflops']:.0f} GFLOP/s "
        f"({res['gemm_peak']['by']}); "
        f"T={res['T']} B={res['B']} I=H; speedup = peer time / our time (> 1: faster)",
        "",
        "| section | H | contender | time | speedup vs torch | GFLOP/s (of peak) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for sec, label in (
        ("train", "train"),
        ("train_bf16", "train, bf16 autocast"),
        ("infer", "infer"),
    ):
        for H, rows in res.get(sec, {}).items():
            for name, r in rows.items():
                g = f"{r['gflops']:.0f} ({r['of_peak']:.0%})" if "gflops" in r else ""
                who = f"{name} ({r['note']})" if "note" in r else name
                lines.append(
                    f"| {label} | {H} | {who} | {r['ms']:.2f} ms | {r['speedup']:.2f}x | {g} |"
                )
    for H, rows in res["step"].items():
        for name, r in rows.items():
            lines.append(
                f"| step (batch 1) | {H} | {name} | {r['us']:.1f} us | {r['speedup']:.2f}x | |"
            )
    gen = res["generate"]
    for name in ("torch.nn.LSTM", "glasslstm"):
        r = gen[name]
        lines.append(
            f"| generate ({gen['model']}) | | {name} | {r['tokens_per_s']:,.0f} tokens/s "
            f"| {r['speedup']:.2f}x | |"
        )
    return "\n".join(lines)

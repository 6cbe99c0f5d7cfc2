"""`glasslstm bench variants`: the regularised LSTM family's training speed on the fused path,
against the plain fused LSTM and against the same cell written as a torch loop.

For each member of the family (layer normalisation, peepholes, cell clipping, zoneout,
recurrent dropout, DropConnect, variational input/output dropout, and all of them together),
one training step — forward and backward of one layer, T x B x H with input size H, in training
mode so that every mask is drawn — is timed for three contenders, alternating inside every
repetition (medians, and medians of the per-repetition ratios):

* ``plain``   ``glasslstm.LSTM(H, H)``: the article's cell on the fused path, the reference;
* ``fused``   ``glasslstm.LSTM(H, H, **member)`` on the fused path (the C++ operator with the
              family's forward and hand-derived backward);
* ``loop``    the same module with ``backend="loop"``: the cell in torch ops, one step at a time,
              differentiated by autograd — what a user writes today for a cell torch.nn.LSTM
              does not have.

Reported: milliseconds per step for each, ``vs_plain`` = plain time / fused time (1: no cost;
the target is >= 0.8) and ``vs_loop`` = loop time / fused time (how much faster the fused path
is than the torch loop; for layer normalisation the target is >= 3).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

import glasslstm
from glasslstm.bench.timing import machine_info, time_once

# each member as glasslstm.LSTM's options, with the rates the literature uses
MEMBERS: dict[str, dict[str, Any]] = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "cell_clip": dict(cell_clip=3.0),
    "zoneout": dict(zoneout_c=0.5, zoneout_h=0.05),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "weight_dropout": dict(weight_dropout=0.5),
    "input_output_dropout": dict(input_dropout=0.3, output_dropout=0.3),
    "all": dict(
        layer_norm=True,
        peephole=True,
        cell_clip=3.0,
        zoneout_c=0.5,
        zoneout_h=0.05,
        recurrent_dropout=0.25,
        weight_dropout=0.5,
        input_dropout=0.3,
        output_dropout=0.3,
    ),
}


def _step(model: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def run():
        x.grad = None
        model(x)[0].backward(dy)

    return run


def bench_member(name: str, H: int, T: int, B: int, reps: int) -> dict:
    """One member's three contenders at hidden size H (see the module's docstring)."""
    torch.manual_seed(0)
    plain = glasslstm.LSTM(H, H, backend="fused")
    fused = glasslstm.LSTM(H, H, backend="fused", **MEMBERS[name])
    loop = glasslstm.LSTM(H, H, backend="loop", **MEMBERS[name])
    fused.load_state_dict(plain.state_dict(), strict=False)  # the family's own: their init
    loop.load_state_dict(fused.state_dict())
    x = torch.randn(T, B, H, requires_grad=True)
    dy = torch.randn(T, B, H)
    fns = {"plain": _step(plain, x, dy), "fused": _step(fused, x, dy), "loop": _step(loop, x, dy)}
    for fn in fns.values():  # warm up (first-use GEMM choices, allocations)
        fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(reps):  # the order rotates every repetition
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(time_once(fns[n], torch.device("cpu")))

    def ratio(slow: str) -> float:  # median over repetitions of slow's time / fused's
        return statistics.median(a / b for a, b in zip(times[slow], times["fused"]))

    return {
        "options": MEMBERS[name],
        "ms": {n: statistics.median(t) * 1e3 for n, t in times.items()},
        "vs_plain": ratio("plain"),
        "vs_loop": ratio("loop"),
    }


def variants_bench(
    members: list[str], H: int, T: int, B: int, reps: int, progress=lambda line: None
) -> dict:
    """Every named member at hidden size H; machine and threads with the figures."""
    out: dict[str, Any] = {
        "machine": machine_info(torch.device("cpu")),
        "H": H,
        "T": T,
        "B": B,
        "reps": reps,
        "members": {},
    }
    for name in members:
        progress(f"{name} ...")
        out["members"][name] = r = bench_member(name, H, T, B, reps)
        progress(f"{name}: {r['vs_plain']:.2f}x plain, {r['vs_loop']:.2f}x loop")
    return out


def variants_table(res: dict) -> str:
    """The figures as a markdown table."""
    m = res["machine"]
    lines = [
        f"CPU: {m.get('cpu')}, {m.get('threads')} threads, load average "
        f"{m.get('loadavg_1m_at_start', '?')} at the start; one layer, training step "
        f"(forward + backward), T={res['T']} B={res['B']} I=H={res['H']}; medians of "
        f"{res['reps']} alternating repetitions",
        "",
        "| variant | options | plain fused | fused | torch loop | fused vs plain | fused vs loop |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["members"].items():
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        ms = r["ms"]
        lines.append(
            f"| {name} | {opts} | {ms['plain']:.1f} ms | {ms['fused']:.1f} ms | "
            f"{ms['loop']:.1f} ms | {r['vs_plain']:.2f}x | {r['vs_loop']:.2f}x |"
        )
    lines.append("")
    lines.append(
        "fused vs plain = plain time / fused time (1.00: the member costs nothing); "
        "fused vs loop = torch-loop time / fused time (> 1: the fused path is faster)"
    )
    return "\n".join(lines)

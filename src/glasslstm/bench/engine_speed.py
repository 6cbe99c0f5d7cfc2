"""Engine speed: forward + backward of glasslstm.LSTM against torch.nn.LSTM, in the same run.

Contenders, all with the same weights (``glasslstm.LSTM.from_torch``):

* ``torch``      torch.nn.LSTM, the peer (oneDNN on the CPU, cuDNN on a GPU)
* ``glass``      glasslstm.LSTM, default backend ("bptt": the hand-derived backward)
* ``glass+gates`` the same, with ``return_gates=True`` (the GateTrace is built and dropped)
* ``loop``       glasslstm.LSTM(backend="loop"): plain autograd loop, for orientation

One timed call = forward and backward of a single layer, sequence-first input (T, B, I) that
requires grad (so dx is computed, as for a layer inside a model), loss = <output, R> for a
fixed random R (i.e. ``output.backward(R)``). Gradients are reset to None between calls, outside
the clock. After a warm-up, every repetition runs each contender once, in an order rotated per
repetition; reported: median time, median of the per-repetition ratios torch/contender (the
contender's speed as a fraction of torch's; > 1 is faster), GFLOP/s from the median time, and
that as a fraction of the float32 GEMM peak measured in this run (the best of this machine's
GEMM implementations at 2048 x 2048: :func:`glasslstm.bench.timing.gemm_peak`).
FLOPs of forward + backward are counted as 3 x the forward GEMMs, 2*T*B*4H*(I+H).

    python -m glasslstm.bench.engine_speed                       # T=100 B=32 H=I in 128 512 1024
    python -m glasslstm.bench.engine_speed --sizes 512 --reps 11 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import glasslstm  # noqa: E402
from glasslstm.bench.timing import announce, command_line, gemm_peak, median, sync, time_once  # noqa: E402

CONTENDERS = ("torch", "glass", "glass+gates", "bptt", "loop")
DESCRIPTION = {
    "torch": "torch.nn.LSTM (peer)",
    "glass": "glasslstm.LSTM (default backend)",
    "glass+gates": "glasslstm.LSTM, return_gates=True",
    "bptt": "glasslstm.LSTM(backend='bptt'), gate math in torch ops",
    "loop": "glasslstm.LSTM(backend='loop')",
}


def lstm_flops(T: int, B: int, I: int, H: int) -> float:
    """Forward + backward FLOPs of one layer: 3 x the forward GEMMs 2*T*B*4H*(I+H)."""
    return 3.0 * 2.0 * T * B * 4 * H * (I + H)


def build(name: str, peer: torch.nn.LSTM):
    """(module, return_gates) of a contender."""
    if name == "torch":
        return peer, False
    if name in ("loop", "bptt"):
        return glasslstm.LSTM.from_torch(peer, backend=name), False
    return glasslstm.LSTM.from_torch(peer), name == "glass+gates"


def make_step(model, gates: bool, x: torch.Tensor, dy: torch.Tensor):
    params = list(model.parameters())

    def reset():
        x.grad = None
        for p in params:
            p.grad = None

    def step():
        out = model(x, return_gates=True)[0] if gates else model(x)[0]
        out.backward(dy)

    return reset, step


def check_same(steps, x: torch.Tensor, device) -> dict:
    """Max |difference| from torch's output and dx, per contender (a sanity check, not a test)."""
    results, ref = {}, None
    for name, (model, gates, reset, _) in steps.items():
        reset()
        out = model(x, return_gates=True)[0] if gates else model(x)[0]
        out.backward(torch.ones_like(out))
        assert x.grad is not None
        got = (out.detach().clone(), x.grad.detach().clone())
        if ref is None:
            ref = got
        results[name] = max((a - b).abs().max().item() for a, b in zip(got, ref))
        reset()
    sync(device)
    return results


def bench_size(args, H: int, device, peak_gflops: float) -> dict:
    T, B, I = args.T, args.B, H
    reps = args.reps or (7 if H <= 512 else 5)
    torch.manual_seed(args.seed)
    peer = torch.nn.LSTM(I, H).to(device)
    x = torch.randn(T, B, I, device=device, requires_grad=True)
    dy = torch.randn(T, B, H, device=device)
    names = [n for n in CONTENDERS if n not in args.skip]
    steps = {}
    for name in names:
        model, gates = build(name, peer)
        reset, step = make_step(model, gates, x, dy)
        steps[name] = (model, gates, reset, step)

    diffs = check_same(steps, x, device)
    for _ in range(args.warmup):
        for name in names:
            steps[name][2]()
            steps[name][3]()
    sync(device)

    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate the order every repetition
            _, _, reset, step = steps[name]
            reset()
            times[name].append(time_once(step, device))
        line = "  ".join(f"{n} {times[n][-1] * 1e3:8.1f}" for n in names)
        print(f"  H={H:<5d} rep {r + 1}/{reps}: {line} ms", flush=True)

    flops = lstm_flops(T, B, I, H)
    rows = {}
    for name in names:
        ratios = [t_ref / t for t_ref, t in zip(times["torch"], times[name])]  # torch always runs
        med = median(times[name])
        gflops = flops / med / 1e9
        rows[name] = {
            "median_ms": med * 1e3,
            "min_ms": min(times[name]) * 1e3,
            "times_ms": [t * 1e3 for t in times[name]],
            "speed_vs_torch": median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "gflops": gflops,
            "frac_peak": gflops / peak_gflops,
            "max_abs_diff_vs_torch": diffs[name],
        }
    gates_overhead = None
    if "glass" in names and "glass+gates" in names:
        gates_overhead = median([g / p - 1.0 for g, p in zip(times["glass+gates"], times["glass"])])
    return {
        "T": T,
        "B": B,
        "I": I,
        "H": H,
        "reps": reps,
        "flops": flops,
        "contenders": rows,
        "gates_overhead": gates_overhead,
    }


def print_table(results: list[dict]) -> None:
    print()
    print(
        "| H | contender | median ms | min ms | speed vs torch (range) | GFLOP/s | of GEMM peak |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for res in results:
        for name, row in res["contenders"].items():
            lo, hi = row["ratio_range"]
            ratio = f"{row['speed_vs_torch']:.2f}x ({lo:.2f}-{hi:.2f})"
            print(
                f"| {res['H']} | {DESCRIPTION[name]} | {row['median_ms']:.1f} | "
                f"{row['min_ms']:.1f} | {ratio} | {row['gflops']:.1f} | "
                f"{100 * row['frac_peak']:.0f}% |"
            )
    print()
    for res in results:
        if res["gates_overhead"] is not None:
            print(
                f"H={res['H']}: return_gates=True costs {100 * res['gates_overhead']:+.1f}% "
                f"(median per-repetition ratio, {res['reps']} repetitions)"
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=100, help="sequence length")
    p.add_argument("--B", type=int, default=32, help="batch size")
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[128, 512, 1024],
        help="hidden sizes H (input size I = H)",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed repetitions per size (default 7 for H<=512, 5 above)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own choice)",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=CONTENDERS[1:],
        help="contenders to leave out, e.g. --skip loop",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write all figures and samples here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = announce(device)
    print(f"T={args.T} B={args.B} I=H in {args.sizes}, float32, 1 layer, fwd+bwd (dx included)")

    peak_before = gemm_peak(device)
    print(
        f"GEMM peak ({peak_before['n']}^2, best of {', '.join(peak_before['rates'])}): "
        f"{peak_before['gflops']:.1f} GFLOP/s by {peak_before['by']}",
        flush=True,
    )

    results = [bench_size(args, H, device, peak_before["gflops"]) for H in args.sizes]

    peak_after = gemm_peak(device)
    print(f"GEMM peak again at the end: {peak_after['gflops']:.1f} GFLOP/s")
    if hasattr(os, "getloadavg"):
        info["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        print(f"load average (1 min) at the end: {info['loadavg_1m_at_end']}")
    # Fractions use the higher of the two medians: the conservative (smaller) fraction.
    peak = max(peak_before["gflops"], peak_after["gflops"])
    for res in results:
        for row in res["contenders"].values():
            row["frac_peak"] = row["gflops"] / peak
    print_table(results)
    print(f"\nGEMM peak used for the fractions: {peak:.1f} GFLOP/s")
    print("max |diff| vs torch (output and dx, float32):")
    for r in results:
        diffs = ", ".join(
            f"{n} {c['max_abs_diff_vs_torch']:.1e}" for n, c in r["contenders"].items()
        )
        print(f"  H={r['H']}: {diffs}")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "command": command_line(),
                    "machine": info,
                    "gemm_peak": {"before": peak_before, "after": peak_after, "used": peak},
                    "results": results,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU fused path in one run: is it right, and how fast is it against cuDNN.

Parts (each one caught on its own: a failure prints its traceback, is recorded, and the run goes
on; the JSON is rewritten after every part, so a run cut short keeps what it had):

1. ``cell``    the Triton cell against TorchCell (forward and backward, dy given and not, row
               strides != H): float32, float64, bfloat16.
2. ``lstm``    glasslstm.LSTM(backend="fused") against backend="bptt" and against torch.nn.LSTM
               (cuDNN, TF32 off): outputs and every gradient, float32 and float64, 1 layer,
               2 layers bidirectional, proj_size, bidirectional + proj_size + batch_first, and
               ragged lengths= against a packed batch.
3. ``graphs``  glasslstm.ops.graphs.graphed(...) (gates on) against the eager module.
4. ``autocast`` the LSTM under bf16 autocast against its float32 results.
5. ``launch``  host cost of one cell call (Triton vs torch ops), for reading the timings.
6. ``speed``   forward + backward (dx included, 1 layer, T=100, I=H, H in {512, 1024},
               B in {64, 256}) of cuDNN, fused (Triton), fused + return_gates, bptt, and the
               graphed fused module with and without gates; in three precision modes: ``fp32``
               (TF32 off everywhere), ``tf32`` (TF32 on for cuDNN and cuBLAS) and ``bf16-autocast``
               (torch.autocast bf16: cuDNN runs bf16; glasslstm runs its layers in float32).
               Contenders alternate within each repetition; the table gives median ms and the
               median per-repetition ratio to cuDNN's time (< 1: faster than cuDNN). No new
               timing starts after ``--budget-s`` seconds (default 120) of the whole run.

Exit status 1 when a part failed or a check is outside its tolerance (the summary says which).

On the GPU machine, from the repository root (torch and triton installed, package not)::

    python -m glasslstm.bench.gpu_check --json $OUT/gpu.json

Smoke test of this script on a CPU (tiny sizes, Triton's interpreter; the fused contender is
handed the interpreted Triton cell in place of the C one, and graphs are skipped)::

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python -m glasslstm.bench.gpu_check \\
        --device cpu --quick --json /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
import traceback

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import glasslstm  # noqa: E402
import glasslstm.ops  # noqa: E402
from glasslstm.bench.timing import command_line, machine_info, median, sync, time_once  # noqa: E402
from glasslstm.ops import graphs  # noqa: E402
from glasslstm.ops.bptt import TORCH_CELL  # noqa: E402

RESULTS: dict = {"command": command_line(), "parts": {}, "failures": []}
START = time.perf_counter()
MODES = ("fp32", "bf16-autocast", "tf32")  # most wanted first, in case the budget runs out
CONTENDERS = ("cudnn", "fused", "fused+gates", "bptt", "graphed", "graphed+gates")


def elapsed() -> float:
    return time.perf_counter() - START


def save(path: str | None) -> None:
    RESULTS["elapsed_s"] = round(elapsed(), 1)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(RESULTS, f, indent=1, default=str)


def part(name: str, fn, path: str | None, *args):
    """Run one part; on failure print and record the traceback and go on."""
    print(f"\n## {name}  (t={elapsed():.0f}s)", flush=True)
    try:
        RESULTS["parts"][name] = fn(*args)
    except Exception:  # noqa: BLE001 - one bug must not lose the other results
        tb = traceback.format_exc()
        print(tb, flush=True)
        RESULTS["failures"].append({"part": name, "traceback": tb})
    save(path)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| scaled by the size of b (absolute for |b| <= 1)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@contextlib.contextmanager
def tf32(on: bool):
    """TF32 for cuDNN and cuBLAS on or off, restored afterwards."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def precision(mode: str, device: torch.device):
    if mode == "fp32":
        with tf32(False):
            yield
    elif mode == "tf32":
        with tf32(True):
            yield
    else:  # TF32 off (cuDNN computes in bf16 here); no autocast cache (CUDA graphs need that)
        with tf32(False), torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            yield


def triton_cell_module():
    from glasslstm.ops import triton_cell

    return triton_cell


def hand_fused_the_triton_cell() -> None:
    """--device cpu only: make backend="fused" use the (interpreted) Triton cell, not the C one."""
    tc = triton_cell_module()
    if not tc.INTERPRETED:
        raise SystemExit(
            "--device cpu runs the Triton kernels in the interpreter: set "
            "TRITON_INTERPRET=1 in the environment"
        )
    original = glasslstm.ops.cell_for

    def cell_for(backend, x, bf16=False):
        if backend == "fused":
            cell, why = tc.cell(x.dtype)
            if cell is None:
                raise ValueError(why)
            return cell
        return original(backend, x, bf16)

    glasslstm.ops.cell_for = cell_for
    glasslstm.ops.uses_operator = lambda backend, x: False  # the Python loop, not the operator


# ---------------------------------------------------------------- 1. the cell


def strided(n, width, dtype, device, pad, scale=1.0, gen=None):
    buf = torch.randn(n, width + pad, generator=gen, dtype=torch.float64) * scale
    return buf.to(device=device, dtype=dtype)[:, 1 : 1 + width]


def cell_problem(n, H, dtype, device, gen):
    a = strided(n, 4 * H, dtype, device, 5, 3.0, gen)
    c_prev = strided(n, H, dtype, device, 7, 2.0, gen)
    dh = strided(n, H, dtype, device, 2, 1.0, gen)
    dy = strided(n, H, dtype, device, 11, 1.0, gen)
    dc = strided(n, H, dtype, device, 4, 1.0, gen)
    return a, c_prev, dh, dy, dc


def cell_run(cell, a, c_prev, dh, dy, dc):
    """Forward then backward of ``cell`` on copies; returns every output."""
    n, H = c_prev.shape
    a = a.clone()
    cs = torch.empty(2, n, H + 4, dtype=a.dtype, device=a.device)
    out = torch.empty(n, H + 9, dtype=a.dtype, device=a.device)[:, 2 : 2 + H]
    c, tc = cs[0, :, :H], cs[1, :, :H]
    cell.forward(a, c_prev, c, tc, out)
    dh, dc = dh.clone(), dc.clone()
    d = torch.empty(n, 4 * H + 5, dtype=a.dtype, device=a.device)[:, 1 : 1 + 4 * H]
    cell.backward(a, c_prev, tc, dh, dy, dc, d, cell.backward_prepare(a, tc, H))
    return {"gates": a, "c": c, "tc": tc, "out": out, "d": d, "dc": dc, "dh": dh}


def check_cell(device, quick):
    tc = triton_cell_module()
    sizes = [(3, 5), (2, 300)] if quick else [(3, 5), (64, 512), (256, 1024), (2, 1000)]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in [(torch.float32, 4e-6), (torch.float64, 1e-12), (torch.bfloat16, 2**-6)]:
        cell, why = tc.cell(dtype)
        if cell is None:
            raise RuntimeError(f"no Triton cell for {dtype}: {why}")
        for n, H in sizes:
            for with_dy in (True, False):
                a, c_prev, dh, dy, dc = cell_problem(n, H, dtype, device, gen)
                dy = dy if with_dy else None
                ours = cell_run(cell, a, c_prev, dh, dy, dc)
                exact = dtype == torch.bfloat16  # bf16: against float64 math on its inputs
                args = [
                    t if t is None or not exact else t.double() for t in (a, c_prev, dh, dy, dc)
                ]
                ref = cell_run(TORCH_CELL, *args)
                errs = {k: rel_err(ours[k], ref[k]) for k in ours}
                worst = max(errs.values())
                rows.append(
                    {
                        "dtype": str(dtype),
                        "n": n,
                        "H": H,
                        "dy": with_dy,
                        "max_rel_err": worst,
                        "tol": tol,
                        "ok": worst <= tol,
                        "errs": errs,
                    }
                )
                print(
                    f"  {str(dtype):15s} n={n:<4d} H={H:<5d} dy={with_dy!s:5s} "
                    f"max rel err {worst:.2e}  {'ok' if worst <= tol else 'FAIL'}",
                    flush=True,
                )
    return rows


# ---------------------------------------------------------------- 2. whole LSTMs


def fwd_bwd(model, x, hx=None, lengths=None, packed=False):
    """Outputs and all gradients for a fixed random loss on output, h_n and c_n."""
    xg = x.detach().clone().requires_grad_(True)
    h = None if hx is None else tuple(t.detach().clone().requires_grad_(True) for t in hx)
    model.zero_grad()
    if packed:
        seq = pack_padded_sequence(xg, lengths, batch_first=model.batch_first, enforce_sorted=False)
        out, (h_n, c_n) = model(seq, h)
        out, _ = pad_packed_sequence(
            out,
            batch_first=model.batch_first,
            total_length=(x.shape[1] if model.batch_first else x.shape[0]),
        )
    elif lengths is not None:
        out, (h_n, c_n) = model(xg, h, lengths=lengths)[:2]
    else:
        out, (h_n, c_n) = model(xg, h)[:2]
    gen = torch.Generator().manual_seed(1)
    loss = sum(
        (t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).sum()
        for t in (out, h_n, c_n)
    )
    loss.backward()
    res = {"output": out, "h_n": h_n, "c_n": c_n, "d_input": xg.grad}
    if h is not None:
        res.update(d_h0=h[0].grad, d_c0=h[1].grad)
    res.update({"d_" + n: p.grad for n, p in model.named_parameters()})
    return res


def compare(a: dict, b: dict) -> dict:
    return {k: rel_err(a[k], b[k]) for k in a}


def check_lstm(device, quick):
    if device.type == "cuda":
        desc = glasslstm.ops.describe("fused", "cuda", torch.float32)
        print(f"  dispatcher: {desc}")
        if "triton" not in desc:
            raise RuntimeError(f"backend='fused' on CUDA does not reach the Triton cell: {desc}")
    configs = {
        "1 layer": dict(num_layers=1),
        "2 layers bi": dict(num_layers=2, bidirectional=True),
        "2 layers proj": dict(num_layers=2, proj_size=7),
        "2 layers bi proj batch_first": dict(
            num_layers=2, bidirectional=True, proj_size=7, batch_first=True
        ),
    }
    sizes = [(6, 3, 4, 9)] if quick else [(9, 4, 8, 16), (50, 32, 256, 256)]
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}
    rows = []
    for dtype in (torch.float32, torch.float64):
        for T, B, I, H in sizes:
            for cname, cfg in configs.items():
                torch.manual_seed(0)
                peer = torch.nn.LSTM(I, H, dtype=dtype, device=device, **cfg)
                fused = glasslstm.LSTM.from_torch(peer, backend="fused")
                bptt = glasslstm.LSTM.from_torch(peer, backend="bptt")
                shape = (B, T, I) if cfg.get("batch_first") else (T, B, I)
                x = torch.randn(shape, dtype=dtype, device=device)
                L = peer.num_layers * (2 if peer.bidirectional else 1)
                hx = (
                    torch.randn(L, B, peer.proj_size or H, dtype=dtype, device=device),
                    torch.randn(L, B, H, dtype=dtype, device=device),
                )
                r_fused = fwd_bwd(fused, x, hx)
                r_bptt = fwd_bwd(bptt, x, hx)
                with tf32(False):
                    r_cudnn = fwd_bwd(peer, x, hx)
                rows += _rows(
                    dtype,
                    (T, B, I, H),
                    cname,
                    "fused vs bptt",
                    compare(r_fused, r_bptt),
                    tol[dtype],
                )
                rows += _rows(
                    dtype,
                    (T, B, I, H),
                    cname,
                    "fused vs torch.nn.LSTM",
                    compare(r_fused, r_cudnn),
                    tol[dtype],
                )
        # ragged: lengths= against a packed batch
        T, B, I, H = sizes[-1]
        torch.manual_seed(0)
        peer = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, dtype=dtype, device=device)
        fused = glasslstm.LSTM.from_torch(peer, backend="fused")
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        x = torch.randn(T, B, I, dtype=dtype, device=device)
        x = x.masked_fill((torch.arange(T)[:, None] >= lengths[None, :]).to(device)[..., None], 0)
        r_fused = fwd_bwd(fused, x, lengths=lengths)
        with tf32(False):
            r_cudnn = fwd_bwd(peer, x, lengths=lengths, packed=True)
        rows += _rows(
            dtype,
            (T, B, I, H),
            "2 layers bi, lengths=",
            "fused vs torch.nn.LSTM",
            compare(r_fused, r_cudnn),
            tol[dtype],
        )
    return rows


def _rows(dtype, size, cname, what, errs, tol):
    worst = max(errs.values())
    ok = worst <= tol
    print(
        f"  {str(dtype):14s} T,B,I,H={size!s:18s} {cname:30s} {what:24s} "
        f"max rel err {worst:.2e}  {'ok' if ok else 'FAIL'}",
        flush=True,
    )
    return [
        {
            "dtype": str(dtype),
            "T_B_I_H": size,
            "config": cname,
            "comparison": what,
            "max_rel_err": worst,
            "tol": tol,
            "ok": ok,
            "errs": errs,
        }
    ]


# ---------------------------------------------------------------- 3. graphs, 4. autocast


def check_graphs(device, quick):
    if device.type != "cuda":
        print("  skipped: CUDA graphs need a CUDA device")
        return {"skipped": "needs CUDA"}
    T, B, I, H = (6, 3, 4, 9) if quick else (30, 16, 64, 128)
    torch.manual_seed(0)
    model = glasslstm.LSTM(I, H, num_layers=2, bidirectional=True, backend="fused").to(device)
    sample = torch.randn(T, B, I, device=device, requires_grad=True)
    step = graphs.graphed(model, (sample,), return_gates=True)
    rows = []
    for k in range(2):
        x = torch.randn(T, B, I, device=device)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        model.zero_grad()
        out, (h, c), trace = model(xa, return_gates=True)
        (out * out).sum().backward()
        eager = [out, h, c, xa.grad] + [p.grad.clone() for p in model.parameters()]
        eager_trace = {n: trace[n].clone() for n in trace.fields}
        model.zero_grad()
        out, (h, c), trace = step(xb)
        (out * out).sum().backward()
        graph = [out, h, c, xb.grad] + [p.grad for p in model.parameters()]
        worst = max(rel_err(a, b) for a, b in zip(graph, eager))
        worst_trace = max(rel_err(trace[n], eager_trace[n]) for n in eager_trace)
        ok = worst <= 1e-6 and worst_trace <= 1e-6
        print(
            f"  call {k}: graphed vs eager max rel err {worst:.2e}, trace {worst_trace:.2e}  "
            f"{'ok' if ok else 'FAIL'}"
        )
        rows.append({"call": k, "max_rel_err": worst, "trace_max_rel_err": worst_trace, "ok": ok})
    try:
        step(x, lengths=[T] * B)
        ragged = "accepted (unexpected)"
    except TypeError as e:
        ragged = f"rejected: {e}"
    print(f"  lengths= on the graphed module: {ragged[:100]}")
    return {"rows": rows, "ragged": ragged}


def check_autocast(device, quick):
    T, B, I, H = (6, 3, 4, 9) if quick else (30, 16, 64, 128)
    rows = []
    for backend in ("fused", "bptt"):
        torch.manual_seed(0)
        model = glasslstm.LSTM(I, H, num_layers=2, bidirectional=True, backend=backend)
        model = model.to(device)
        x = torch.randn(T, B, I, device=device)
        with tf32(False):
            plain = fwd_bwd(model, x)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                cast = fwd_bwd(model, x)
        errs = compare(cast, plain)
        dtypes = sorted({str(t.dtype) for t in cast.values()})
        worst = max(errs.values())
        ok = worst <= 1e-6 and dtypes == ["torch.float32"]
        print(
            f"  {backend}: bf16 autocast vs float32 max rel err {worst:.2e}, result dtypes "
            f"{dtypes}  {'ok' if ok else 'FAIL'}"
        )
        rows.append({"backend": backend, "max_rel_err": worst, "dtypes": dtypes, "ok": ok})
    return rows


def launch_cost(device, quick):
    """Host-side microseconds per cell call (n=64, H=512), Triton vs torch ops."""
    tc = triton_cell_module()
    n, H, calls = (4, 8, 3) if quick else (64, 512, 300)
    cell, _ = tc.cell(torch.float32)
    gen = torch.Generator().manual_seed(0)
    a, c_prev, dh, dy, dc = cell_problem(n, H, torch.float32, device, gen)
    c = torch.empty(n, H, device=device)
    tcb, out = torch.empty_like(c), torch.empty_like(c)
    res = {}
    for name, cl in (("triton", cell), ("torch", TORCH_CELL)):
        cl.forward(a.clone(), c_prev, c, tcb, out)  # warm (compile)
        work = a.clone()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            cl.forward(work, c_prev, c, tcb, out)
        host = (time.perf_counter() - t0) / calls
        sync(device)
        total = (time.perf_counter() - t0) / calls
        res[name] = {"host_us_per_call": host * 1e6, "us_per_call_synced": total * 1e6}
        print(
            f"  {name:6s} cell.forward n={n} H={H}: {host * 1e6:7.1f} us host per call, "
            f"{total * 1e6:7.1f} us per call incl. GPU"
        )
    return res


# ---------------------------------------------------------------- 6. speed


def build(name, peer, fused, bptt, x):
    """(callable, return_gates) for a contender."""
    if name == "cudnn":
        return peer, False
    if name in ("fused", "fused+gates"):
        return fused, name == "fused+gates"
    if name == "bptt":
        return bptt, False
    gates = name == "graphed+gates"
    return graphs.graphed(fused, (x,), return_gates=gates), gates


def bench_shape(device, T, B, H, mode, reps, warmup, names):
    torch.manual_seed(0)
    peer = torch.nn.LSTM(H, H, device=device)
    fused = glasslstm.LSTM.from_torch(peer, backend="fused")
    bptt = glasslstm.LSTM.from_torch(peer, backend="bptt")
    x = torch.randn(T, B, H, device=device, requires_grad=True)
    dy = torch.randn(T, B, H, device=device)
    dys = {dt: dy.to(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    params = list(peer.parameters()) + list(fused.parameters()) + list(bptt.parameters())
    row = {"T": T, "B": B, "H": H, "I": H, "mode": mode, "reps": reps, "contenders": {}}
    with precision(mode, device):
        steps = {}
        for name in names:
            try:
                model, gates = build(name, peer, fused, bptt, x)
            except Exception as e:  # noqa: BLE001 - e.g. graphs on the CPU
                row["contenders"][name] = {"error": f"{type(e).__name__}: {e}"}
                continue

            graphed = name.startswith("graphed")

            def step(model=model, gates=gates and not graphed):
                # a graphed module was captured with or without gates: called with x only
                res = model(x, return_gates=True) if gates else model(x)
                res[0].backward(dys[res[0].dtype])

            steps[name] = step

        def reset():
            x.grad = None
            for p in params:
                p.grad = None

        for _ in range(warmup):
            for step in steps.values():
                reset()
                step()
        sync(device)
        times = {n: [] for n in steps}
        order = list(steps)
        for r in range(reps):
            k = r % len(order)
            for name in order[k:] + order[:k]:  # rotate the order every repetition
                reset()
                times[name].append(time_once(steps[name], device))
    base = times.get("cudnn")
    for name, ts in times.items():
        entry = {
            "median_ms": median(ts) * 1e3,
            "min_ms": min(ts) * 1e3,
            "times_ms": [t * 1e3 for t in ts],
        }
        if base:
            entry["ratio_vs_cudnn"] = median([t / b for t, b in zip(ts, base)])
        row["contenders"][name] = entry
    line = "  ".join(
        f"{n} {e['median_ms']:.2f}" if "median_ms" in e else f"{n} n/a"
        for n, e in row["contenders"].items()
    )
    print(f"  {mode:13s} T={T} B={B:<4d} H={H:<5d} {line} ms", flush=True)
    del steps, fused, bptt, peer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def speed(device, quick, budget_s, path):
    shapes = (
        [(5, 2, 16), (5, 4, 32)]
        if quick
        else [(100, 64, 512), (100, 256, 512), (100, 64, 1024), (100, 256, 1024)]
    )
    reps, warmup = (2, 1) if quick else (7, 2)
    names = list(CONTENDERS)
    rows = []
    RESULTS["parts"]["speed"] = rows
    for mode in MODES:
        for T, B, H in shapes:
            if elapsed() > budget_s:
                print(f"  time budget ({budget_s:.0f}s) spent: {mode} T={T} B={B} H={H} skipped")
                rows.append({"T": T, "B": B, "H": H, "mode": mode, "skipped": "time budget"})
                continue
            try:
                rows.append(bench_shape(device, T, B, H, mode, reps, warmup, names))
            except Exception:  # noqa: BLE001
                tb = traceback.format_exc()
                print(tb, flush=True)
                RESULTS["failures"].append({"part": f"speed {mode} B={B} H={H}", "traceback": tb})
            save(path)
    return rows


def print_tables() -> None:
    print("\n## summary\n")
    for name in ("cell", "lstm"):
        rows = RESULTS["parts"].get(name) or []
        bad = [r for r in rows if not r["ok"]]
        worst = max((r["max_rel_err"] for r in rows), default=float("nan"))
        print(
            f"- {name}: {len(rows) - len(bad)}/{len(rows)} checks ok "
            f"(worst rel err {worst:.2e})" + (f"; FAILED: {bad}" if bad else "")
        )
    for name in ("graphs", "autocast"):
        val = RESULTS["parts"].get(name)
        rows = val.get("rows", []) if isinstance(val, dict) else (val or [])
        print(f"- {name}: " + (", ".join("ok" if r["ok"] else "FAIL" for r in rows) or str(val)))
    rows = [r for r in RESULTS["parts"].get("speed") or [] if "contenders" in r]
    if rows:
        print(
            "\nforward + backward, 1 layer, I = H; ms (median) and time / cuDNN's time "
            "(median of per-repetition ratios; < 1 is faster than cuDNN)\n"
        )
        print("| mode | T | B | H | " + " | ".join(CONTENDERS) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(CONTENDERS))
        for r in rows:
            cells = []
            for n in CONTENDERS:
                e = r["contenders"].get(n, {})
                if "median_ms" not in e:
                    cells.append("n/a")
                elif n == "cudnn":
                    cells.append(f"{e['median_ms']:.2f}")
                else:
                    ratio = e.get("ratio_vs_cudnn", float("nan"))
                    cells.append(f"{e['median_ms']:.2f} ({ratio:.2f}x)")
            print(f"| {r['mode']} | {r['T']} | {r['B']} | {r['H']} | " + " | ".join(cells) + " |")
    if RESULTS["failures"]:
        print(
            f"\n{len(RESULTS['failures'])} part(s) failed: "
            + ", ".join(f["part"] for f in RESULTS["failures"])
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the script)")
    p.add_argument("--json", metavar="PATH", help="write every result here (after each part)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=120.0,
        help="start no new timing after this many seconds of the run (default 120)",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["cell", "lstm", "graphs", "autocast", "launch", "speed"],
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu with TRITON_INTERPRET=1 to smoke-test)")
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET on the GPU: it would time the interpreter")
    if device.type == "cpu":
        hand_fused_the_triton_cell()
    info = machine_info(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"not importable: {e}"
    RESULTS["machine"] = info
    RESULTS["args"] = vars(args)
    print("command:", command_line())
    for k, v in info.items():
        print(f"{k}: {v}")
    save(args.json)

    for name, fn in [
        ("cell", check_cell),
        ("lstm", check_lstm),
        ("graphs", check_graphs),
        ("autocast", check_autocast),
        ("launch", launch_cost),
    ]:
        if name not in args.skip:
            with tf32(False):  # the checks compare full float32 (and float64) results
                part(name, fn, args.json, device, args.quick)
    if "speed" not in args.skip:
        part("speed", speed, args.json, device, args.quick, args.budget_s, args.json)
    print_tables()
    save(args.json)
    print(f"\ntotal {elapsed():.0f}s" + (f"; wrote {args.json}" if args.json else ""))
    return 1 if RESULTS["failures"] or failed_checks() else 0


def failed_checks() -> list:
    """Every correctness row with ok False, from all parts."""
    bad = []
    for name, val in RESULTS["parts"].items():
        rows = val.get("rows", []) if isinstance(val, dict) else val
        bad += [(name, r) for r in rows or [] if isinstance(r, dict) and r.get("ok") is False]
    return bad


if __name__ == "__main__":
    raise SystemExit(main())

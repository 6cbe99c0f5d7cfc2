"""Training memory against sequence length: glasslstm.LSTM with and without ``checkpoint=S``.

One training step = forward of ``--layers`` glasslstm.LSTM layers over (T, B, I) float32 input,
``output.backward(R)`` for a fixed random R (T, B, H), and an SGD step. For each T the step
runs without checkpointing and with ``checkpoint=S`` (default S = round(sqrt(T)), which about
balances the segment boundaries against one segment's recomputed activations). Reported: the
peak memory the step needs above what existed before it, and the step's time.

Time: in one more fresh process per T, both models (same weights) take turns, ``--reps``
times, the order swapped every repetition (the machines here are shared and noisy); reported
are the median step times and the median of the per-repetition ratios checkpoint/off.

How the peak is measured:

* **CPU**: every configuration runs in a fresh Python process, so nothing that one
  configuration freed (and the C allocator kept) is reused by the next. In that process the
  model, input and R are built and one short warm-up step runs (one-time buffers: MKL,
  the fused kernels, the autograd engine). Then the kernel's high-water mark of resident memory
  is reset (``echo 5 > /proc/self/clear_refs``), the measured steps run, and the figure is
  ``VmHWM - VmRSS`` (peak resident set during the steps minus the resident set just before).
  glibc's malloc is told to serve every block over 128 KiB with its own mmap and to give freed
  memory back at once (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``; by default its
  thresholds grow, and freed tensors stay resident and get reused, so the high-water mark
  would understate a step's need). This is physical memory actually touched, at page
  granularity, including what is not a tensor (autograd nodes, MKL scratch); it is the number
  that decides whether a run fits in RAM. Where /proc/self/clear_refs cannot be written the
  script falls back to ``ru_maxrss`` minus the resident set before the steps (an upper
  bound, since the warm-up could not be excluded) and says so.
* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the steps: the caching allocator's exact peak of live tensors.

    python -m glasslstm.bench.memory_peak                # T 1000 2000 5000 10000, H=256, B=16
    python -m glasslstm.bench.memory_peak --quick        # seconds: T 300 600, H=64, B=8
    python -m glasslstm.bench.memory_peak --T 1000 4000 --hidden 128 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys

import torch  # noqa: E402

from glasslstm.bench.timing import announce, command_line, median, sync, time_once  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ----------------------------------------------------------------------------- one configuration


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _setup(spec: dict):
    """A worker's threads and device, and ``(T, B, I, H, checkpoint)`` from its spec."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    return torch.device(spec["device"]), tuple(spec[k] for k in ("T", "B", "I", "H", "checkpoint"))


def worker(spec: dict) -> dict:
    """Build, warm up, then measure ``spec["steps"]`` training steps; returns the figures."""
    import glasslstm

    device, (T, B, I, H, S) = _setup(spec)
    torch.manual_seed(0)
    model = glasslstm.LSTM(
        I, H, spec["layers"], backend=spec["backend"], checkpoint=S, device=device
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(T, B, I, device=device)
    R = torch.randn(T, B, H, device=device)

    def step(x, R):
        out, _ = model(x)
        out.backward(R)
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm = min(T, max(2 * S, 64))  # long enough to run segments, short enough to be quick
    step(x[:warm], R[:warm])
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        method = "torch.cuda.max_memory_allocated"
    else:
        import gc

        gc.collect()
        base = _proc_status("VmRSS")
        method = "VmHWM - VmRSS (clear_refs)" if _reset_peak_rss() else "ru_maxrss - VmRSS"
    for _ in range(spec["steps"]):
        step(x, R)
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    elif method.startswith("VmHWM"):
        peak = _proc_status("VmHWM") - base
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        **spec,
        "peak_bytes": peak,
        "method": method,
        "inputs_bytes": (x.numel() + R.numel()) * x.element_size(),
    }


def timing_worker(spec: dict) -> dict:
    """Step times without and with checkpointing, taking turns (see the module docstring)."""
    import glasslstm

    device, (T, B, I, H, S) = _setup(spec)
    torch.manual_seed(0)
    models = {0: glasslstm.LSTM(I, H, spec["layers"], backend=spec["backend"], device=device)}
    models[S] = glasslstm.LSTM(
        I, H, spec["layers"], backend=spec["backend"], checkpoint=S, device=device
    )
    models[S].load_state_dict(models[0].state_dict())
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    x = torch.randn(T, B, I, device=device)
    R = torch.randn(T, B, H, device=device)

    def step(k, x, R):
        out, _ = models[k](x)
        out.backward(R)
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)

    warm = min(T, max(2 * S, 64))
    for k in models:
        step(k, x[:warm], R[:warm])
    times: dict[int, list[float]] = {0: [], S: []}
    for r in range(spec["reps"]):
        for k in (0, S) if r % 2 == 0 else (S, 0):
            times[k].append(time_once(functools.partial(step, k, x, R), device))
    ratios = [on / off for on, off in zip(times[S], times[0])]
    return {"T": T, "checkpoint": S, "off_s": times[0], "on_s": times[S], "ratios": ratios}


# ----------------------------------------------------------------------------- the sweep


def run_config(spec: dict, flag: str = "--worker") -> dict:
    """``worker(spec)`` (or ``timing_worker``) in a fresh Python process (see the docstring)."""
    env = {**os.environ, **MALLOC_ENV}
    cmd = [sys.executable, os.path.abspath(__file__), flag, json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def segment_for(T: int, requested: int) -> int:
    return requested or max(1, round(math.sqrt(T)))


def print_table(rows: list[list[dict]]) -> None:
    mib = 2.0**20
    print()
    print(
        "| T | S | peak MiB, off | peak MiB, checkpoint=S | memory ratio | step s, off | "
        "step s, checkpoint=S | time ratio (range) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for off, on, timing in rows:
        print(
            f"| {off['T']} | {on['checkpoint']} | {off['peak_bytes'] / mib:.1f} | "
            f"{on['peak_bytes'] / mib:.1f} | {on['peak_bytes'] / off['peak_bytes']:.3f} | "
            f"{median(timing['off_s']):.2f} | {median(timing['on_s']):.2f} | "
            f"{median(timing['ratios']):.2f}x ({min(timing['ratios']):.2f}-"
            f"{max(timing['ratios']):.2f}) |"
        )
    print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--T", type=int, nargs="+", default=[1000, 2000, 5000, 10000], help="sequence lengths"
    )
    p.add_argument("--hidden", type=int, default=256, help="hidden size H")
    p.add_argument("--input", type=int, default=0, help="input size I (0: = H)")
    p.add_argument("--batch", type=int, default=16, help="batch size B")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument(
        "--checkpoint",
        type=int,
        default=0,
        help="steps per segment S (0: round(sqrt(T)) for each T)",
    )
    p.add_argument("--steps", type=int, default=1, help="training steps in each memory measurement")
    p.add_argument(
        "--reps", type=int, default=3, help="timed steps per model, taking turns (0: no timing)"
    )
    p.add_argument("--backend", default=None, help="glasslstm backend (default: auto)")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="seconds: T 300 600, H=64, B=8 (checks that the script works)",
    )
    p.add_argument("--json", metavar="PATH", help="also write every figure here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--timing-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.timing_worker:
        print(json.dumps(timing_worker(json.loads(args.timing_worker))))
        return 0
    if args.quick:
        args.T, args.hidden, args.batch, args.steps, args.reps = [300, 600], 64, 8, 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = announce(device)
    I = args.input or args.hidden
    print(
        f"H={args.hidden} I={I} B={args.batch} layers={args.layers} float32; one step = "
        f"forward + backward(R) + SGD; memory over {args.steps} step(s), time median of "
        f"{args.reps} alternating steps"
    )

    rows = []
    for T in args.T:
        row = []
        for S in (0, segment_for(T, args.checkpoint)):
            spec = {
                "T": T,
                "B": args.batch,
                "I": I,
                "H": args.hidden,
                "layers": args.layers,
                "checkpoint": S,
                "steps": args.steps,
                "backend": args.backend,
                "device": args.device,
                "threads": args.threads,
                "reps": args.reps,
            }
            res = run_config(spec)
            print(
                f"  T={T:<6d} checkpoint={S:<4d} peak {res['peak_bytes'] / 2**20:8.1f} MiB  "
                f"({res['method']})",
                flush=True,
            )
            row.append(res)
        timing = {"off_s": [math.nan], "on_s": [math.nan], "ratios": [math.nan]}
        if args.reps:
            timing = run_config(spec, "--timing-worker")
            print(
                f"  T={T:<6d} step {median(timing['off_s']):.2f} s off, "
                f"{median(timing['on_s']):.2f} s with checkpoint={S} "
                f"(median ratio {median(timing['ratios']):.2f})",
                flush=True,
            )
        rows.append(row + [timing])
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"command": command_line(), "machine": info, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Timing helpers shared by every benchmark in :mod:`glasslstm.bench`.

How benchmarks are run here (docs/ARCHITECTURE.md section 4): the machines are shared and noisy,
so every script times its contenders against the peer *in the same run*, alternating them inside
each repetition, and reports medians: the median time per contender and the median of the
per-repetition ratios. Throughput is also given as a fraction of the machine's float32 GEMM
peak, measured by :func:`sgemm_peak` in the same run.
"""

from __future__ import annotations

import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from glasslstm.ops.gemm import cpu_model


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that one call of ``fn`` takes, queued device work included.

    Garbage is collected before the clock starts, and the collector is off while it runs, so a
    collection triggered by an earlier contender's garbage is not charged to this one.
    """
    gc.collect()
    sync(device)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start
    finally:
        if was_enabled:
            gc.enable()


def gemm_peak(device: torch.device, n: int = 2048, reps: int = 5, warmup: int = 2) -> dict:
    """The machine's float32 GEMM rate: the best, over the implementations this machine has,
    of the median rate of (n, n) products — on the CPU torch.mm (its BLAS), oneDNN's matmul
    (torch.ops.mkldnn's linear, where torch has oneDNN) and glasslstm's blocked oneDNN
    micro-kernel; on a GPU torch.mm. A figure "of peak" divides by this, so an LSTM that uses
    a faster GEMM than torch.mm is not reported above 100%.

    Returns ``{"n", "gflops" (the best median), "by" (its implementation), "rates" (every
    implementation's median GFLOP/s)}``.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    out = torch.empty(n, n, device=device)
    candidates = {"torch.mm": lambda: torch.mm(a, b, out=out)}
    if device.type == "cpu":
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            bt = b.t().contiguous()
            candidates["oneDNN matmul"] = lambda: torch.ops.mkldnn._linear_pointwise(
                a, bt, None, "none", [], ""
            )
        from glasslstm.ops import native

        if native.available():
            candidates["glasslstm oneDNN kernel"] = lambda: torch.ops.glasslstm.mm(a, b, "onednn")
    flops = 2.0 * n**3
    rates = {}
    for name, fn in candidates.items():
        try:
            for _ in range(warmup):
                fn()
            samples = [time_once(fn, device) for _ in range(reps)]
        except RuntimeError:  # an implementation this build cannot run
            continue
        rates[name] = flops / statistics.median(samples) / 1e9
    best = max(rates, key=lambda k: rates[k])
    return {"n": n, "gflops": rates[best], "by": best, "rates": rates}


def machine_info(device: torch.device) -> dict:
    """What a reader needs to place the figures: torch, threads, CPU, GPU, Python."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "device": str(device),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    if hasattr(os, "getloadavg"):  # other work on a shared machine shows up here
        info["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def cpu_flags() -> str:
    """The vector extensions the CPU reports that matter to the kernels (avx2, avx512*, amx*)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                    return " ".join(w for w in wanted if w in line.split())
    except OSError:
        pass
    return ""


def command_line() -> str:
    """The exact command that ran this script, ready to paste into a shell."""
    return shlex.join([os.path.basename(sys.executable)] + sys.argv)


def median(xs) -> float:
    return statistics.median(xs)


def announce(device: torch.device) -> dict:
    """Print the command line and :func:`machine_info` (a benchmark's header); return the info."""
    info = machine_info(device)
    print("command:", command_line())
    for k, v in info.items():
        print(f"{k}: {v}")
    return info

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


def sgemm_peak(device: torch.device, n: int = 2048, reps: int = 7, warmup: int = 2) -> dict:
    """The machine's float32 GEMM rate: median over ``reps`` of ``torch.mm`` on (n, n) matrices.

    Returns ``{"n", "gflops" (median), "gflops_max", "samples_s"}``.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    out = torch.empty(n, n, device=device)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    samples = [time_once(lambda: torch.mm(a, b, out=out), device) for _ in range(reps)]
    flops = 2.0 * n**3
    return {
        "n": n,
        "gflops": flops / statistics.median(samples) / 1e9,
        "gflops_max": flops / min(samples) / 1e9,
        "samples_s": samples,
    }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where present)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """What a reader needs to place the figures: torch, threads, CPU, GPU, Python."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "device": str(device),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    if hasattr(os, "getloadavg"):  # other work on a shared machine shows up here
        info["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


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

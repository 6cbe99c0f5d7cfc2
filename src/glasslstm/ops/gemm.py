"""Which matrix-product implementation the CPU operators use, chosen by measuring.

The candidates (see csrc/gemm.h) are torch's own: ``"torch"`` (torch.addmm's path: the BLAS
torch was built with, MKL on x86), ``"onednn"`` (oneDNN's batch-reduce GEMM micro-kernel, as
torch exposes it, blocked and threaded by glasslstm) and, for the per-step products only,
``"onednn_linear"`` (oneDNN's inner product on the weight reordered once per call into its own
layout, through torch's mkldnn operators). Which is faster depends on the CPU: MKL is
known to take slower paths on non-Intel CPUs; oneDNN does not. So nothing assumes a vendor:
on first use each role is timed on this machine with the shapes it will run, the faster
candidate is kept, and the choice is cached per CPU model and torch version in
``~/.cache/glasslstm/gemm.json``. Roles:

* ``step``: the per-step recurrent products of the time loops (a few rows of h against the
  whole recurrent weight, every step; one-thread products when the batch rows are split over
  the threads, threaded ones otherwise). Timed where they run: a short forward loop of a layer
  of the same sizes with each candidate (:func:`probe_loop`), not the product alone. Between
  the gate math of the steps a product meets other caches than in a tight loop of products:
  on a 2-core Xeon, oneDNN's kernel lost to torch's BLAS by 5% alone and beat it by 10-15%
  inside the loop;
* ``big``: the products over all steps at once (input projection, input and weight gradients),
  timed alone (:func:`probe`);
* ``bf16``: whether, under ``torch.autocast("cpu", dtype=torch.bfloat16)``, bf16 products
  (float32 result) beat float32 ones here, timed in the loop as ``step`` is — only then are
  they used.

``$GLASSLSTM_GEMM`` forces a choice: ``torch`` or ``onednn`` for both roles, ``onednn_linear``
for the step products (torch's for the big ones), or one per role, as in
``step=onednn_linear,big=onednn``; ``$GLASSLSTM_BF16=0`` / ``=1`` forces the bf16 decision. In
deterministic mode (:func:`glasslstm.deterministic`) both roles take ``torch``, whatever was
measured.
:func:`describe` says what was chosen and why (``glasslstm bench speed`` prints it).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

from glasslstm.ops.native import constant_under_compile

CANDIDATES = ("torch", "onednn", "onednn_linear")
BIG_CANDIDATES = ("torch", "onednn")  # onednn_linear packs a weight: per-step products only
ROLES = ("step", "big")
ENV = "GLASSLSTM_GEMM"
ENV_BF16 = "GLASSLSTM_BF16"

_lock = threading.RLock()  # a decision may ask for another (bf16: the float32 step choice)
_memory: dict[str, object] = {}


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    from glasslstm.data import cache_dir

    return cache_dir() / "gemm.json"


# How decisions are measured; part of the machine's key, so that decisions measured another
# way (by an earlier version) are measured again rather than mixed with these.
METHOD = "step and bf16 timed in the loop, float32 weights packed in 32-column blocks"


def _machine_key() -> str:
    # the candidates are part of the key: a decision made among fewer is measured again
    return (
        f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
        f" | {','.join(step_candidates())} | {METHOD}"
    )


def step_candidates() -> tuple[str, ...]:
    """The candidates for the per-step products here (onednn_linear needs torch's mkldnn)."""
    if torch.backends.mkldnn.is_available():
        return CANDIDATES
    return BIG_CANDIDATES


def _bucket(n: int) -> int:
    """Sizes are measured at the next power of two (at least 16): a handful of measurements
    cover every shape."""
    b = 16
    while b < n:
        b *= 2
    return b


def _split_threads(B: int, H: int, P: int) -> int:
    """How many threads the time loops split the batch rows over (1: none)."""
    from glasslstm.ops import native  # the question may come before any layer loaded them

    if not native.load():
        return 1
    return int(torch.ops.glasslstm.loop_threads(B, 4 * H * P * 4))


def probe(candidate: str, m: int, n: int, k: int, threads: int, reps: int = 7) -> float:
    """Seconds per product (m x k) (k x n) by ``candidate`` (``"bf16"``: bf16 operands)."""
    return float(torch.ops.glasslstm.gemm_probe(candidate, m, n, k, reps, threads))


LOOP_STEPS = 16  # steps of the loop that probe_loop times (the weight is packed once per call)


def probe_loop(candidate: str, B: int, H: int, P: int, reps: int = 5) -> float:
    """Seconds per step of a layer's forward time loop (inference; B rows, hidden size H,
    output size P) with its per-step products by ``candidate`` (``"bf16"``: bf16 products, as
    under autocast where they are used). The input has one feature, so that the input
    projection, the same for every candidate, is negligible. The best of ``reps`` calls after
    one untimed one; draws no numbers from torch's random stream."""
    from glasslstm.ops import native

    native.load()
    gen = torch.Generator().manual_seed(0)
    scale = H**-0.5
    x = torch.randn(LOOP_STEPS, B, 1, generator=gen)
    h0, c0 = torch.zeros(B, P), torch.zeros(B, H)
    w_ih = torch.randn(4 * H, 1, generator=gen) * scale
    w_hh = torch.randn(4 * H, P, generator=gen) * scale
    bias = torch.zeros(4 * H)
    w_hr = torch.randn(P, H, generator=gen) * scale if P != H else None  # a projection
    bf16 = candidate == "bf16"
    step = "torch" if bf16 else candidate
    args = (x, h0, c0, w_ih, w_hh, bias, bias, w_hr, None, False, False, False, bf16, step, "torch")
    best = float("inf")
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for i in range(reps + 1):
            t0 = time.perf_counter()
            torch.ops.glasslstm.lstm_layer(*args)
            if i:
                best = min(best, time.perf_counter() - t0)
    return best / LOOP_STEPS


def _fastest(problem: tuple[int, int, int, int]) -> tuple[str, dict]:
    """The fastest candidate for a large product (m, n, k, threads), by :func:`probe`."""
    m, n, k, threads = problem
    times = {c: probe(c, m, n, k, threads) for c in BIG_CANDIDATES}
    return min(times, key=lambda c: times[c]), times


def _fastest_loop(problem: tuple[int, int, int, int]) -> tuple[str, dict]:
    """The fastest candidate for a loop's per-step products, by :func:`probe_loop`."""
    B, H, P, _ = problem
    times = {c: probe_loop(c, B, H, P) for c in step_candidates()}
    return min(times, key=lambda c: times[c]), times


def _load() -> dict:
    try:
        data = json.loads(_cache_file().read_text("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(data: dict) -> None:
    from glasslstm.rundir import atomic_write_json

    try:
        atomic_write_json(_cache_file(), data)
    except OSError:
        pass  # a read-only cache: measure again next time


def busy() -> bool:
    """Whether other work holds this machine's cores now (then a measurement is kept for this
    process only, not stored for the next ones: the loops and products are timed on the wall
    clock, their threads sharing the cores with that work)."""
    try:
        return os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1)
    except OSError:
        return False


def _decide(key: str, measure) -> tuple[str, dict]:
    """The cached decision for ``key`` on this machine, or ``measure()``'s, stored (unless the
    machine was busy when it was measured)."""
    mkey = _machine_key()
    with _lock:
        full = f"{mkey} | {key}"
        if full in _memory:
            return _memory[full]  # type: ignore[return-value]
        data = _load()
        entry = data.get(mkey, {}).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("choice"), str):
            found = (entry["choice"], entry.get("seconds", {}))
        else:
            choice, seconds = measure()
            found = (choice, seconds)
            if not busy():
                data.setdefault(mkey, {})[key] = {"choice": choice, "seconds": seconds}
                _store(data)
        _memory[full] = found
        return found


def _forced() -> dict[str, str]:
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return {}
    if spec in CANDIDATES:
        return {"step": spec, "big": spec if spec in BIG_CANDIDATES else "torch"}
    forced = {}
    for part in spec.split(","):
        role, _, name = part.partition("=")
        role, name = role.strip(), name.strip()
        allowed = BIG_CANDIDATES if role == "big" else CANDIDATES
        if role not in ROLES or name not in allowed:
            raise ValueError(
                f"${ENV}={spec!r}: use one of {CANDIDATES}, or role=name pairs such as "
                f"'step=onednn_linear,big=torch' (roles: {', '.join(ROLES)}; big takes "
                f"{' or '.join(BIG_CANDIDATES)})"
            )
        forced[role] = name
    return forced


def step_problem(B: int, H: int, P: int) -> tuple[int, int, int, int]:
    """(B, H, P, threads) of a time loop, bucketed (rows to a power of two, sizes to the next
    power of two from 16); threads is 1 where the loop splits its rows over the threads (its
    products run on one thread each), 0 where its products are threaded."""
    rows = 1
    while rows < B:
        rows *= 2
    Hb, Pb = _bucket(H), _bucket(P)
    return rows, Hb, Pb, 1 if _split_threads(rows, Hb, Pb) > 1 else 0


def big_problem(H: int, I: int) -> tuple[int, int, int, int]:
    """(m, n, k, threads) of the input projection, bucketed, on 256 rows (the time per row is
    what matters; more rows only make the first call slower)."""
    return 256, _bucket(4 * H), _bucket(I), 0


def providers(dtype: torch.dtype, B: int, H: int, P: int, I: int) -> tuple[str, str]:
    """``(step, big)``: the candidates the operators use for a layer of these sizes."""
    # every layer call asks: answered from memory after the first time for these sizes
    return _providers(
        dtype,
        B,
        H,
        P,
        I,
        torch.get_num_threads(),
        os.environ.get(ENV, ""),
        torch.are_deterministic_algorithms_enabled() or torch.jit.is_tracing(),
    )


@functools.lru_cache(maxsize=4096)
def _providers(dtype, B, H, P, I, threads, env, pinned) -> tuple[str, str]:
    forced = _forced()
    # float64, a jit trace, deterministic mode (a measured choice could differ from run to
    # run): torch's
    if dtype != torch.float32 or pinned:
        return forced.get("step", "torch"), forced.get("big", "torch")
    step = _step_choice(B, H, P)
    bp = big_problem(H, I)
    big = forced.get("big") or _decide("big {} {} {} {}".format(*bp), lambda: _fastest(bp))[0]
    return step, big


def _step_choice(B: int, H: int, P: int) -> str:
    """The per-step products' candidate for a float32 loop of these sizes: forced, or the
    fastest measured."""
    forced = _forced().get("step")
    if forced:
        return forced
    sp = step_problem(B, H, P)
    key = "loop B={} H={} P={} {}".format(*sp)
    return _decide(key, lambda: _fastest_loop(sp))[0]


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16, AMX; bf16 on Arm): elsewhere bf16
    products are emulated and never pay."""
    return bool(_bf16_flags())


@functools.cache
def _bf16_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"}))
    except OSError:
        pass
    return ""


def bf16_pays(B: int, H: int, P: int) -> bool:
    """Whether bf16 products beat float32 ones here for a layer of these sizes (autocast)."""
    env = os.environ.get(ENV_BF16)
    if env in ("0", "1"):
        return env == "1"
    if torch.jit.is_tracing() or not native_bf16():
        return False
    return _bf16_pays(B, H, P, torch.get_num_threads())


@functools.lru_cache(maxsize=1024)
def _bf16_pays(B: int, H: int, P: int, threads: int) -> bool:
    problem = step_problem(B, H, P)

    def measure():
        # float32 as it would run: with the step products chosen (or forced) for this layer
        f32 = _step_choice(B, H, P)
        Bb, Hb, Pb, _ = problem
        times = {"float32": probe_loop(f32, Bb, Hb, Pb), "bf16": probe_loop("bf16", Bb, Hb, Pb)}
        return min(times, key=lambda c: times[c]), times

    return _decide("bf16 B={} H={} P={} {}".format(*problem), measure)[0] == "bf16"


# The decisions for a layer's tensors. Under torch.compile the sizes may be symbolic: the
# decision is then the one for a typical layer (32 rows, H = 512), made once while tracing.
_TYPICAL = (32, 512, 512, 512)


@constant_under_compile
def _typical_providers() -> tuple[str, str]:
    return providers(torch.float32, *_TYPICAL)


@constant_under_compile
def _typical_bf16() -> bool:
    return bf16_pays(*_TYPICAL[:3])


def layer_providers(x: torch.Tensor, w_hh: torch.Tensor) -> tuple[str, str]:
    """:func:`providers` for a layer with input ``x`` (T, B, I) and weight ``w_hh`` (4H, P)."""
    if torch.compiler.is_compiling():
        return _typical_providers() if x.dtype == torch.float32 else ("torch", "torch")
    return providers(x.dtype, x.shape[1], w_hh.shape[0] // 4, w_hh.shape[1], x.shape[2])


def layer_bf16(x: torch.Tensor, w_hh: torch.Tensor) -> bool:
    """:func:`bf16_pays` for a layer with input ``x`` (T, B, I) and weight ``w_hh`` (4H, P)."""
    if torch.compiler.is_compiling():
        return _typical_bf16()
    return bf16_pays(x.shape[1], w_hh.shape[0] // 4, w_hh.shape[1])


def describe(B: int = 32, H: int = 512, P: int | None = None, I: int | None = None) -> str:
    """What the operators use for a layer of these sizes on this machine, with the times."""
    P, I = P or H, I or H
    step, big = providers(torch.float32, B, H, P, I)
    lines = [
        f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"layer B={B} H={H}: step products by {step}, large products by {big}"
        + (f" (forced by ${ENV})" if _forced() else ""),
        f"bf16 products under autocast: {'yes' if bf16_pays(B, H, P) else 'no (float32)'}",
    ]
    return "; ".join(lines)


def forget() -> None:
    """Drop the decisions held in this process (the cache file stays): the next layer call
    decides again, from the file or by measuring."""
    _memory.clear()
    _providers.cache_clear()
    _bf16_pays.cache_clear()


def remeasure() -> None:
    """Measure afresh: drop this machine's stored decisions, in the file and in memory."""
    with _lock:
        data = _load()
        if data.pop(_machine_key(), None) is not None:
            _store(data)
    forget()


def decisions() -> dict:
    """Every decision made on this machine so far: {key: {"choice", "seconds"}}."""
    return dict(_load().get(_machine_key(), {}))

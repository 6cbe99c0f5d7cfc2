"""Deterministic mode: bitwise identical results from run to run.

    glasslstm.set_deterministic(True)            # for the rest of the process
    with glasslstm.deterministic():              # for a block; the settings come back after
        ...
    glasslstm train --deterministic              # TrainConfig(deterministic=True)

Same seed, same data, same machine, same software and the same number of threads then give
the same bits, training included. What decides that, found by measurement on a CPU (torch
2.13, MKL 2024.2, oneDNN 3.12, AVX-512) and from the libraries' documentation:

* **Seeds.** Everything random in glasslstm takes a seed (the trainer: ``TrainConfig.seed``).
* **The number of intra-op threads** — the one thing that changed results on the CPU. ATen
  splits a reduction (``sum``, norms, ``mean``) into one chunk per thread, and MKL splits a
  GEMM's inner dimension among threads: a 10^6-element ``sum`` and a (512 x 4096) @ (4096 x
  512) sgemm give different bits with 1 and with 2 threads. With the same count they repeat
  exactly. Pass ``threads=`` (``--threads``) to pin it; the default, torch's, is the number of
  cores or ``$OMP_NUM_THREADS``, so it can differ between machines and shells.
* **MKL's conditional numerical reproducibility** (``MKL_CBWR``). MKL reads it once, while
  ``import torch`` runs, so it must be in the environment before Python starts; setting it
  later does nothing (checked). Not needed on one machine: torch turns MKL's dynamic
  threading off and aligns every CPU tensor to 64 bytes, and a (64 x 333) @ (333 x 257) sgemm
  gave the same bits for 16 different misalignments of its input anyway.
  ``MKL_CBWR=AUTO,STRICT`` makes GEMMs independent of the thread count too (measured; torch's
  own reductions still are not), and a fixed code path such as ``MKL_CBWR=AVX2`` makes them
  equal across CPU generations (slower).
* **torch.use_deterministic_algorithms(True)**: an op with no deterministic implementation
  (mostly CUDA: ``index_add_``, ``scatter_add_``, ...) raises instead of varying silently;
  oneDNN (used on the CPU by convolutions and ``torch.nn.LSTM``, not by glasslstm's LSTM) is
  asked for deterministic kernels; and ``torch.empty`` memory is filled with NaN, so that a
  read of uninitialised memory shows up instead of differing from run to run. It cost under
  5% of a training step of ``glasslstm.LSTM`` (measured: 2x256, T=128, B=32).
* **CUDA**: cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (set here unless already set;
  it must be in place before the process's first cuBLAS call), and cuDNN
  ``torch.backends.cudnn.deterministic = True`` with ``benchmark = False``. With these, two
  training runs on an H100 (torch 2.11) gave the same bits, and no op refused to run.
* Python's hash seed (``PYTHONHASHSEED``) does not matter: the tests train under two.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = ":4096:8"  # 8 buffers of 4 MiB: NVIDIA's setting for reproducibility


def set_deterministic(enabled: bool = True, *, threads: int | None = None) -> None:
    """Switch deterministic mode on (or off) for the rest of the process.

    On: ``torch.use_deterministic_algorithms(True)``, cuDNN deterministic and not
    benchmarking, ``$CUBLAS_WORKSPACE_CONFIG`` set to ``:4096:8`` unless already set. Off: the
    torch flags back to torch's defaults (the environment stays). ``threads``: also fix the
    number of intra-op threads (``torch.set_num_threads``); results are reproducible only
    between runs with the same number.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int; got {threads!r}")
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(bool(enabled))
    torch.backends.cudnn.deterministic = bool(enabled)
    if enabled:
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault(CUBLAS_ENV, CUBLAS_DETERMINISTIC)


def is_deterministic() -> bool:
    """Whether torch is in deterministic mode (as :func:`set_deterministic` leaves it)."""
    return torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic


def status() -> dict:
    """What decides reproducibility in this process, for logs and bug reports."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "threads": torch.get_num_threads(),
        # what MKL read at `import torch`, if nobody changed the environment since
        "mkl_cbwr": os.environ.get("MKL_CBWR") if torch.backends.mkl.is_available() else None,
        "cublas_workspace_config": os.environ.get(CUBLAS_ENV),
    }


@contextmanager
def deterministic(enabled: bool = True, *, threads: int | None = None) -> Iterator[None]:
    """:func:`set_deterministic` for the ``with`` block; afterwards every setting it touched
    (torch's flags, the thread count, ``$CUBLAS_WORKSPACE_CONFIG``) is as it was.
    ``enabled=False`` changes nothing (so ``with deterministic(cfg.deterministic):`` works)."""
    if not enabled:
        yield
        return
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.get_num_threads(),
        os.environ.get(CUBLAS_ENV),
    )
    try:
        set_deterministic(True, threads=threads)
        yield
    finally:
        algorithms, warn_only, cudnn_det, cudnn_bench, n_threads, cublas = saved
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        torch.backends.cudnn.deterministic = cudnn_det
        torch.backends.cudnn.benchmark = cudnn_bench
        if torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
        if cublas is None:
            os.environ.pop(CUBLAS_ENV, None)
        else:
            os.environ[CUBLAS_ENV] = cublas

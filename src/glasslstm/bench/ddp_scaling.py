"""Data-parallel scaling on one machine: N processes x 1 thread against 1 process x N threads.

``python -m glasslstm.bench.ddp_scaling --data PATH [--nproc 2] [--rounds 2] [...]``

Both train the same model with the same global batch (``--batch-size`` rows of ``--seq-len``
tokens) for ``--steps`` steps, through the command users run: ``glasslstm train --threads N``
and ``glasslstm train --threads 1 --nproc N``. The figure is training tokens per second (the
global batch's tokens over the time of the training steps, from each run's metrics.jsonl),
measured from the end of step ``--skip`` on, so that process start-up, loading and the first
steps' one-time work are left out. The two run one after the other, in alternating order, for
``--rounds`` rounds; the medians are reported, with the ratio of each round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from glasslstm.bench.timing import announce, median
from glasslstm.viz import read_metrics


def tokens_per_s(run_dir: Path, skip: int, tokens_per_step: int) -> float:
    """Tokens/s of the training steps after step ``skip`` (metrics.jsonl's cumulative
    ``seconds`` counts the training steps alone)."""
    rows = {r["step"]: r["seconds"] for r in read_metrics(run_dir / "metrics.jsonl")}
    last = max(rows)
    return (last - skip) * tokens_per_step / (rows[last] - rows[skip])


def one_run(common: list[str], nproc: int, parallel: bool, out: Path) -> None:
    threads = ["--threads", "1", "--nproc", str(nproc)] if parallel else ["--threads", str(nproc)]
    command = [sys.executable, "-m", "glasslstm", "train", *common, *threads, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if parallel else str(nproc)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glasslstm.bench.ddp_scaling", description=__doc__)
    p.add_argument("--data", required=True, help="training text (e.g. tiny-shakespeare)")
    p.add_argument("--nproc", type=int, default=2, help="processes, and threads of the one")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="the global batch (rows)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = p.parse_args(argv)
    if not 0 < args.skip < args.steps:
        p.error("--skip must be between 0 and --steps")
    info = announce(torch.device("cpu"))
    common = ["--data", args.data, "--hidden", str(args.hidden), "--layers", str(args.layers)]
    common += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    common += ["--max-steps", str(args.steps), "--eval-every", str(10 * args.steps)]
    common += ["--eval-batches", "1", "--log-every", "1", "--json"]
    tokens = args.batch_size * args.seq_len
    n = args.nproc
    names = {False: f"1 process x {n} threads", True: f"{n} processes x 1 thread"}
    figures: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for parallel in (r % 2 == 0, r % 2 == 1):  # alternate which goes first
                out = Path(tmp) / f"{r}-{int(parallel)}"
                one_run(common, n, parallel, out)
                figures[parallel].append(tokens_per_s(out, args.skip, tokens))
                print(f"round {r + 1}: {names[parallel]}: {figures[parallel][-1]:,.0f} tokens/s")
    ratios = [a / b for a, b in zip(figures[True], figures[False])]
    result = {
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "tokens_per_s": {names[k]: v for k, v in figures.items()},
        "median_tokens_per_s": {names[k]: median(v) for k, v in figures.items()},
        "speedup_per_round": ratios,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    for k in (False, True):
        print(f"{names[k]}: median {median(figures[k]):,.0f} tokens/s")
    print(f"{names[True]} / {names[False]}: " + ", ".join(f"{x:.2f}" for x in ratios))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

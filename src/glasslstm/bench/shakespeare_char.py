"""Char-level tiny-shakespeare: validation loss against wall time, glasslstm vs torch.nn.LSTM.

The same LanguageModel, trainer, data, seed and recipe for both; only the LSTM inside differs
(``glasslstm.LSTM`` or ``torch.nn.LSTM`` with the same initial weights — it is a drop-in).
Each engine trains for ``--minutes`` of training time (validation excluded), one after the
other, with the machine otherwise idle. Validation is the whole nanoGPT split (last 10%).

Recipe (that of the reference torch.nn.LSTM run below): 2 x 512, AdamW 2e-3, batch 32 x 128
chars, clip 1.0; dropout 0.25; warm-up 100 steps, then cosine to 5% at the end of the time budget.

    python -m glasslstm.bench.shakespeare_char --data-dir DIR --minutes 30
    python -m glasslstm.bench.shakespeare_char --data-dir DIR --minutes 30 --side-by-side
    python -m glasslstm.bench.shakespeare_char --data-dir DIR --minutes 2 --engines glasslstm

``--side-by-side`` runs the engines at the same time, each in its own process pinned to its
own core with one thread: equal conditions even on a machine that is doing other work too.

Writes ``--out`` (default runs/bench-shakespeare/) with one run directory per engine,
``results.json`` and ``curves.png`` (validation loss in nats/char against minutes).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path

import torch

from glasslstm import LanguageModel, TrainConfig, train  # noqa: E402
from glasslstm.bench.timing import command_line, machine_info  # noqa: E402
from glasslstm.viz import read_metrics  # noqa: E402

# torch.nn.LSTM 2x512 with this recipe, measured on another 2-core machine in November 2026
# (not in this run): minute -> best validation loss. Printed and drawn for orientation only.
ANCHORS = {
    5: 1.573,
    10: 1.482,
    15: 1.456,
    20: 1.440,
    25: 1.433,
    30: 1.443,
}
NANOGPT = 1.4697  # nanoGPT's char transformer, 10.7M parameters, ~3 min on an A100


def torch_engine(config, tokenizer) -> LanguageModel:
    """The same LanguageModel with torch.nn.LSTM inside, starting from the same weights."""
    model = LanguageModel(config, tokenizer)
    peer = model.lstm.to_torch()  # same configuration and initial weights
    model.lstm = peer  # type: ignore[assignment]
    return model


def run_engine(engine: str, args, out: Path) -> list[dict]:
    cfg = TrainConfig(
        data="shakespeare",
        data_dir=args.data_dir,
        hidden=args.hidden,
        layers=args.layers,
        dropout=args.dropout,
        seq_len=128,
        batch_size=32,
        lr=2e-3,
        clip=1.0,
        warmup=100,
        min_lr_ratio=0.05,
        max_steps=10**7,
        time_budget=args.minutes * 60,
        eval_every=args.eval_every,
        seed=args.seed,
        threads=args.threads,
        out=str(out / engine),
        batching=args.batching,
    )
    build = torch_engine if engine == "torch" else LanguageModel
    res = train(cfg, progress=not args.quiet, build_model=build)
    vals = [r for r in read_metrics(out / engine / "metrics.jsonl") if r["split"] == "val"]
    print(
        f"{engine}: {res.step} steps, {res.tokens_per_s:,.0f} tokens/s, best val "
        f"{res.best_val_loss:.4f} nats/char",
        flush=True,
    )
    return [{"minutes": r["seconds"] / 60, "step": r["step"], "loss": r["loss"]} for r in vals]


def at_minute(curve: list[dict], minute: float) -> float:
    """Best validation loss reached by ``minute`` minutes of training."""
    seen = [p["loss"] for p in curve if p["minutes"] <= minute + 1e-9]
    return min(seen) if seen else math.nan


def plot(curves: dict, path: Path, minutes: float, side: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for engine, curve in curves.items():
        ax.plot(
            [p["minutes"] for p in curve],
            [p["loss"] for p in curve],
            "o-",
            ms=3,
            label=f"{engine} (this run)",
        )
    xs = [m for m in ANCHORS if m <= minutes]
    other = "torch.nn.LSTM, another machine (2026-11)"
    ax.plot(xs, [ANCHORS[m] for m in xs], "k--", alpha=0.5, label=other)
    ax.axhline(NANOGPT, color="grey", lw=0.8, ls=":", label="nanoGPT char transformer (A100)")
    ax.set_xlabel("training time, minutes" + (" (one core each)" if side else " (2 CPU cores)"))
    ax.set_ylabel("validation loss, nats/char")
    ax.set_ylim(1.3, 2.2)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("tiny-shakespeare, char level, 2 x 512 LSTM")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def side_by_side(args, out: Path) -> dict:
    """Each engine in a subprocess pinned to its own core (one thread); returns the curves."""
    import subprocess

    engines = args.engines.split(",")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < len(engines):
        raise SystemExit(
            f"--side-by-side needs {len(engines)} cores; this process has {len(cores)}"
        )
    procs = []
    for engine, core in zip(engines, cores):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--minutes",
            str(args.minutes),
            "--engines",
            engine,
            "--threads",
            "1",
            "--out",
            str(out / f"{engine}-core{core}"),
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--dropout",
            str(args.dropout),
            "--eval-every",
            str(args.eval_every),
            "--seed",
            str(args.seed),
            "--batching",
            args.batching,
            "--quiet",
        ]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        log = open(out / f"{engine}.log", "w")
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=functools.partial(os.sched_setaffinity, 0, {core}),
            )
        )
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"an engine failed; see the logs in {out}")
    curves = {}
    for engine, core in zip(engines, cores):
        res = json.loads((out / f"{engine}-core{core}" / "results.json").read_text())
        curves[engine] = res["curves"][engine]
    return curves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="where tinyshakespeare/input.txt is")
    p.add_argument("--minutes", type=float, default=30.0, help="training minutes per engine")
    p.add_argument("--engines", default="glasslstm,torch")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument(
        "--batching",
        choices=("stream", "random"),
        default="stream",
        help="stream: TBPTT with the state carried; random: independent windows",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="runs/bench-shakespeare")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="run the engines at once, each pinned to its own core with one thread",
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(command_line())
    print(machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    if args.side_by_side:
        print("side by side: each engine on its own core, one thread")
    info = machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    curves = {}
    if args.side_by_side:
        curves = side_by_side(args, out)
    else:
        for engine in args.engines.split(","):
            curves[engine] = run_engine(engine, args, out)
            (out / "results.json").write_text(
                json.dumps({"command": command_line(), "machine": info, "curves": curves}, indent=2)
            )
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": command_line(),
                "machine": info,
                "side_by_side": args.side_by_side,
                "curves": curves,
            },
            indent=2,
        )
    )
    marks = [m for m in (5, 10, 15, 20, 25, 30, 45, 60) if m <= args.minutes]
    print("\nbest validation loss (nats/char) reached by minute:")
    print("minute  " + "  ".join(f"{e:>10}" for e in curves) + "  torch, other machine (2026-11)")
    for m in marks:
        row = "  ".join(f"{at_minute(c, m):10.4f}" for c in curves.values())
        print(f"{m:6d}  {row}  {ANCHORS.get(m, math.nan):10.3f}")
    plot(curves, out / "curves.png", args.minutes, args.side_by_side)
    print(f"\nwrote {out / 'results.json'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()

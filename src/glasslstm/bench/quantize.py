"""Weight-only int8 against float32: the batch-1 step, batched inference, and what it costs in
bits per character on a trained model's validation split.

    python -m glasslstm.bench.quantize                       # speed: H = 512 and 1024, 2 layers
    python -m glasslstm.bench.quantize --run RUN --data-dir DIR   # + quality of a trained model
    python -m glasslstm.bench.quantize --sizes 1024 --layers 1 --json out.json

Speed: the float32 model and its int8 copy (glasslstm.quantize.int8) step the same inputs,
taking turns within every repetition; medians per call and the median ratio. Batched: one
forward over T x B under no_grad, likewise. Quality: ``glasslstm.trainer.evaluate`` of the run's
best model on its validation split, float32 and int8 (the same model rounded).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch

import glasslstm
from glasslstm import quantize
from glasslstm.bench.timing import announce, command_line, time_once


def _pair_times(fns: dict, reps: int) -> dict:
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % 2 :] + names[: r % 2]:
            times[n].append(time_once(fns[n], torch.device("cpu")))
    return {n: statistics.median(t) for n, t in times.items()}


def bench_step(H: int, layers: int, calls: int, reps: int) -> dict:
    torch.manual_seed(0)
    f32 = glasslstm.LSTM(H, H, num_layers=layers).eval()
    i8 = quantize.int8(copy.deepcopy(f32))
    x = torch.randn(H)
    streams = {"float32": glasslstm.Stream(f32), "int8": glasslstm.Stream(i8)}

    def run(s):
        def f():
            for _ in range(calls):
                s.step(x)

        return f

    with torch.no_grad():
        t = _pair_times({k: run(s) for k, s in streams.items()}, reps)
    us = {k: v / calls * 1e6 for k, v in t.items()}
    return {"us": us, "speedup": us["float32"] / us["int8"]}


def bench_batched(H: int, layers: int, T: int, B: int, reps: int) -> dict:
    torch.manual_seed(0)
    f32 = glasslstm.LSTM(H, H, num_layers=layers).eval()
    i8 = quantize.int8(copy.deepcopy(f32))
    x = torch.randn(T, B, H)
    with torch.no_grad():
        t = _pair_times({"float32": lambda: f32(x), "int8": lambda: i8(x)}, reps)
    return {"ms": {k: v * 1e3 for k, v in t.items()}, "speedup": t["float32"] / t["int8"]}


def quality(run_dir: str, data_dir: str | None) -> dict:
    from glasslstm.data import encode_corpus, load_corpus
    from glasslstm.model import LanguageModel
    from glasslstm.rundir import read_config
    from glasslstm.trainer import chars_per_token, evaluate

    model = LanguageModel.load(run_dir).eval()
    train_cfg = read_config(run_dir)["train"]
    corpus = load_corpus(train_cfg.get("data"), data_dir=data_dir, seed=0)
    tok = model.require_tokenizer()
    _, val = encode_corpus(tok, corpus)
    cpt = chars_per_token(tok, corpus.val, len(val))
    rounded = copy.deepcopy(model)
    quantize.int8(rounded)
    bpc = {
        name: evaluate(m, val, chars_per_token=cpt)["bpc"]
        for name, m in (("float32", model), ("int8", rounded))
    }
    return {"run": run_dir, "corpus": corpus.name, **bpc, "bpc_lost": bpc["int8"] - bpc["float32"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="512,1024", help="hidden sizes, comma-separated")
    p.add_argument("--layers", type=int, default=2, help="stacked layers (default: 2)")
    p.add_argument("--calls", type=int, default=50, help="steps per timed repetition")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per contender")
    p.add_argument("--run", help="a trained run directory: also measure the bits per char lost")
    p.add_argument("--data-dir", help="where the run's corpus is looked up (as for train)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    info = announce(torch.device("cpu"))
    res: dict = {"command": command_line(), "machine": info, "step": {}, "batched": {}}
    for H in (int(s) for s in args.sizes.split(",")):
        res["step"][H] = r = bench_step(H, args.layers, args.calls, args.reps)
        print(
            f"step H={H} x{args.layers}: float32 {r['us']['float32']:.1f} us, int8 "
            f"{r['us']['int8']:.1f} us: {r['speedup']:.2f}x",
            flush=True,
        )
        res["batched"][H] = r = bench_batched(H, args.layers, 100, 32, max(3, args.reps // 3))
        print(
            f"batched T=100 B=32 H={H}: float32 {r['ms']['float32']:.1f} ms, int8 "
            f"{r['ms']['int8']:.1f} ms: {r['speedup']:.2f}x",
            flush=True,
        )
    if args.run:
        res["quality"] = q = quality(args.run, args.data_dir)
        print(
            f"{q['corpus']} validation: float32 {q['float32']:.4f} bpc, int8 {q['int8']:.4f} "
            f"bpc: {q['bpc_lost']:+.4f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

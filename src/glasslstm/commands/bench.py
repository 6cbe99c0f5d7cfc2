"""glasslstm bench: the long-term-memory claim measured (memory), the vanishing gradient, and
speed against torch.nn.LSTM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from glasslstm import options
from glasslstm.config import INITS, TASKS, VARIANT_MEMBERS
from glasslstm.config import MEMORY_MODELS as MODELS
from glasslstm.errors import ConfigError

POSITIVE = options.integer(1)
MEMORY_OPTIONS = {
    "budget": POSITIVE,
    "batch_size": POSITIVE,
    "hidden": POSITIVE,
    "lr": options.number(0, low_open=True),
    "seed": options.SEED,
}
GRADIENT_OPTIONS = {"T": POSITIVE, "budget": POSITIVE, "hidden": POSITIVE, "seed": options.SEED}
VARIANTS_OPTIONS = {
    "hidden": POSITIVE,
    "T": POSITIVE,
    "batch_size": POSITIVE,
    "reps": POSITIVE,
    "threads": options.integer(0, options.MAX_THREADS, note="0: torch's default"),
}
SPEED_OPTIONS = {
    "T": POSITIVE,
    "batch_size": POSITIVE,
    "reps": POSITIVE,
    "gen_tokens": POSITIVE,
    "gen_layers": POSITIVE,
    "gen_hidden": POSITIVE,
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: long-term memory (LSTM vs GRU vs RNN), gradients, speed",
        description="Benchmarks that print figures and write JSON + PNG.",
    )
    kinds = p.add_subparsers(dest="bench", metavar="BENCH")
    kinds.required = True

    m = kinds.add_parser(
        "memory",
        help="LSTM vs GRU vs vanilla RNN on long-dependency tasks",
        description="Train each model on the task at each T with the same budget "
        "of training sequences; print held-out metric, baseline, solved or not "
        "and after how many sequences.",
    )
    m.add_argument(
        "--task",
        choices=TASKS,
        default="adding",
        help="adding (sum two marked numbers), copy (recall symbols after a gap) or subject "
        "(the pronoun of a name seen T tokens before) (default: adding)",
    )
    m.add_argument(
        "--T",
        default="50,100,200",
        help="comma-separated dependency lengths, in time steps (default: 50,100,200)",
    )
    m.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated models to compare (default: lstm,gru,rnn)",
    )
    m.add_argument(
        "--budget",
        type=int,
        default=50_000,
        help="training sequences each model sees (default: 50000)",
    )
    m.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    m.add_argument("--hidden", type=int, default=128, help="hidden units per model (default: 128)")
    m.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: 0.001)")
    m.add_argument(
        "--init",
        choices=INITS,
        default="forget1",
        help="the LSTM's gate biases: forget1 (forget bias 1, the default) or chrono "
        "(Tallec & Ollivier 2018: forget biases log U[1, L-1], L the sequence length)",
    )
    m.add_argument("--seed", type=int, default=0, help="seed of data and init (default: 0)")
    _outputs(m, "memory")
    m.set_defaults(run=run_memory)

    g = kinds.add_parser(
        "gradient",
        help="plot log ||dL/dh_t|| against T - t for RNN, GRU, LSTM",
        description="Gradient norms at every distance, at initialisation and "
        "after training, and the LSTM's gradient along the cell path.",
    )
    g.add_argument(
        "--task", choices=TASKS, default="adding", help="the task trained on (default: adding)"
    )
    g.add_argument(
        "--T", type=int, default=100, help="sequence length, in time steps (default: 100)"
    )
    g.add_argument(
        "--budget",
        type=int,
        default=20_000,
        help="training sequences before the second measurement (default: 20000)",
    )
    g.add_argument("--hidden", type=int, default=64, help="hidden units per model (default: 64)")
    g.add_argument("--seed", type=int, default=0, help="seed of data and init (default: 0)")
    _outputs(g, "gradient")
    g.set_defaults(run=run_gradient)

    _add_speed(kinds)
    _add_variants(kinds)
    _add_onnx(kinds)
    _add_gemm(kinds)


def _add_gemm(kinds) -> None:
    k = kinds.add_parser(
        "gemm",
        help="which matrix-product implementation this machine uses, measured afresh",
        description="Time each candidate (torch's BLAS, oneDNN's micro-kernel, oneDNN's "
        "inner product) for the products of an LSTM of each hidden size, store the fastest for "
        "later runs, and print the times: 'loop' lines are a time loop's per-step products, "
        "timed per step of a short forward loop (the gate math between them); 'big' lines the "
        "products over all steps, timed alone; 'bf16' lines whether bf16 products beat "
        "float32 ones in the loop (under autocast). A trailing 1: the loop splits its rows "
        "over the threads (one-thread products), 0: threaded products. Run it on a quiet "
        "machine: the choice stays until it is run again.",
    )
    k.add_argument("--sizes", default="128,512,1024", help="comma-separated hidden sizes (I = H)")
    k.add_argument("--batch-size", type=int, default=32, help="rows of the batch (default: 32)")
    k.set_defaults(run=run_gemm)


def _add_onnx(kinds) -> None:
    o = kinds.add_parser(
        "onnx",
        help="text generation with onnxruntime (exported model) beside glasslstm's Stream",
        description="Generate text one token at a time, the LSTM state carried, with "
        "onnxruntime on the exported model and with glasslstm's LMStream on the same weights; "
        "print tokens/s of a whole generation and microseconds per step for both. The timings "
        "alternate inside every repetition; figures are medians. Both get --threads threads.",
    )
    o.add_argument(
        "run_dir",
        nargs="?",
        metavar="RUN",
        help="a run directory (default: a random char model of --layers x --hidden)",
    )
    o.add_argument("--layers", type=int, default=2, help="random model's layers (default: 2)")
    o.add_argument(
        "--hidden", type=int, default=256, help="random model's hidden units (default: 256)"
    )
    o.add_argument("--tokens", type=int, default=300, help="tokens per timed run (default: 300)")
    o.add_argument("--reps", type=int, default=5, help="timed repetitions (default: 5)")
    o.add_argument("--threads", type=int, default=1, help="threads for each runtime (default: 1)")
    _outputs(o, "onnx")
    o.set_defaults(run=run_onnx)


def run_onnx(args) -> int:
    from glasslstm.bench.onnx import onnx_bench, onnx_table, random_char_model
    from glasslstm.model import LanguageModel

    if min(args.layers, args.hidden, args.tokens, args.reps, args.threads) < 1:
        raise ConfigError("--layers, --hidden, --tokens, --reps and --threads must be >= 1")
    if args.run_dir:
        model = LanguageModel.load(args.run_dir)
    else:
        model = random_char_model(args.layers, args.hidden)
    log = _log(args)
    res = onnx_bench(
        model, args.tokens, args.reps, args.threads, progress=log or (lambda line: None)
    )
    return _write_results(args, "onnx", res, onnx_table)


def run_gemm(args) -> int:
    import torch

    from glasslstm.ops import gemm, native

    sizes = _ints(args.sizes, "sizes")
    options.check({"batch_size": args.batch_size}, {"batch_size": POSITIVE})
    if not native.available():
        raise ConfigError(f"the CPU operators are not available: {native.status()}")
    gemm.remeasure()
    print(f"CPU: {gemm.cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for H in sizes:
        gemm.providers(torch.float32, args.batch_size, H, H, H)
        gemm.bf16_pays(args.batch_size, H, H)
    for key, d in sorted(gemm.decisions().items()):
        times = ", ".join(f"{c} {s * 1e6:.1f} us" for c, s in d["seconds"].items())
        print(f"{key}: {d['choice']} ({times})")
    if gemm.busy():
        print("note: other work held the cores; the choices were measured but not stored")
    return 0


def _add_speed(kinds) -> None:
    s = kinds.add_parser(
        "speed",
        help="glasslstm vs torch.nn.LSTM: training, inference, batch-1 step, generation",
        description=SPEED_HELP,
    )
    s.add_argument(
        "--sizes",
        default="128,512,1024",
        help="comma-separated hidden sizes H; the input size is H too (default: 128,512,1024)",
    )
    s.add_argument(
        "--T", type=int, default=100, help="time steps per sequence, train and infer (default: 100)"
    )
    s.add_argument("--batch-size", type=int, default=32, help="sequences per batch (default: 32)")
    s.add_argument(
        "--reps", type=int, default=5, help="timed repetitions per contender (default: 5)"
    )
    s.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to run; auto: a GPU if there is one, else the CPU (default: auto)",
    )
    s.add_argument(
        "--gen-tokens", type=int, default=300, help="tokens generated per model (default: 300)"
    )
    s.add_argument(
        "--gen-layers", type=int, default=2, help="layers of the generation model (default: 2)"
    )
    s.add_argument(
        "--gen-hidden",
        type=int,
        default=512,
        help="hidden units of the generation model (default: 512)",
    )
    s.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke test")
    _outputs(s, "speed")
    s.set_defaults(run=run_speed)


SPEED_HELP = """\
glasslstm against torch.nn.LSTM (oneDNN on the CPU, cuDNN on a GPU), timed in the same run,
each contender alternating with its peer in every repetition; figures are medians. Ratios are
the peer's time / glasslstm's time: above 1 means glasslstm is faster.

  train       forward + backward of one layer, T x B x H (input size H): glasslstm, glasslstm
              recording its gates, torch.nn.LSTM (and a jitted JAX scan LSTM if jax is
              installed; on a GPU also the CUDA-graphed module). GFLOP/s, and the
              fraction of the fastest matrix-product rate
              measured on this machine.
  train_bf16  the same under torch.autocast(bfloat16): glasslstm uses bf16 products only
              where this CPU runs them faster than float32; the peer is torch's bf16 LSTM.
  infer       forward only, under torch.no_grad().
  step        one token of one sequence (batch 1), state carried: the drop-in call
              lstm(x, (h, c)) and glasslstm.Stream.step, against torch.nn.LSTM's call.
  generate    tokens/s of a character language model (--gen-layers x --gen-hidden).

The CPU model, torch's version, threads and the matrix-product choice are printed with the
figures; JSON goes to --out.
"""


def run_speed(args) -> int:
    from glasslstm.bench.speed import speed_bench, speed_table

    options.check_args(args, SPEED_OPTIONS)
    sizes = _ints(args.sizes, "sizes")
    device = options.resolve_device(args.device).type
    kw = dict(
        sizes=sizes,
        T=args.T,
        B=args.batch_size,
        reps=args.reps,
        device=device,
        gen_tokens=args.gen_tokens,
        gen_layers=args.gen_layers,
        gen_hidden=args.gen_hidden,
    )
    if args.quick:
        kw.update(
            sizes=[16], T=8, B=4, reps=1, step_calls=20, gen_tokens=10, gen_layers=1, gen_hidden=16
        )
    log = _log(args)
    res = speed_bench(progress=log or (lambda line: None), **kw)
    return _write_results(args, "speed", res, speed_table)


def _add_variants(kinds) -> None:
    v = kinds.add_parser(
        "variants",
        help="the regularised LSTM family: fused speed vs the plain LSTM and vs a torch loop",
        description="For each member of the family (layer normalisation, peepholes, cell "
        "clipping, zoneout, recurrent dropout, DropConnect, variational input/output dropout, "
        "all together), time one training step (forward + backward of one layer, T x B x H, "
        "input size H, training mode) of the plain fused LSTM, the member on the fused path "
        "and the member written as a torch loop (backend='loop', autograd), alternating in "
        "every repetition. Prints milliseconds (medians) and two ratios (medians of the "
        "per-repetition ratios): plain time / fused time (1.00: the member costs nothing) "
        "and loop time / fused time (> 1: the fused path is that many times faster).",
    )
    v.add_argument(
        "--members",
        default=",".join(VARIANT_MEMBERS),
        help=f"comma-separated members to time, from {', '.join(VARIANT_MEMBERS)} "
        "(default: all of them)",
    )
    v.add_argument("--hidden", type=int, default=512, help="hidden units H (default: 512)")
    v.add_argument("--T", type=int, default=100, help="time steps per sequence (default: 100)")
    v.add_argument("--batch-size", type=int, default=32, help="sequences per batch (default: 32)")
    v.add_argument("--reps", type=int, default=5, help="timed repetitions (default: 5)")
    v.add_argument(
        "--threads", type=int, default=0, help="CPU threads torch uses (default: 0, torch's own)"
    )
    _outputs(v, "variants")
    v.set_defaults(run=run_variants)


def run_variants(args) -> int:
    options.check_args(args, VARIANTS_OPTIONS)
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    unknown = [m for m in members if m not in VARIANT_MEMBERS]
    if unknown or not members:
        raise ConfigError(
            f"--members: unknown {unknown or members!r}; choose from {', '.join(VARIANT_MEMBERS)}"
        )
    import torch

    from glasslstm.bench.variants import variants_bench, variants_table

    if args.threads:
        torch.set_num_threads(args.threads)
    log = _log(args)
    res = variants_bench(
        members, args.hidden, args.T, args.batch_size, args.reps, progress=log or (lambda s: None)
    )
    return _write_results(args, "variants", res, variants_table)


def _write_results(args, name: str, res: dict, table) -> int:
    """``res`` as ``--out``/NAME.json, and printed: as JSON with --json, else as ``table(res)``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(table(res))
        print(f"\nwrote {out / f'{name}.json'}")
    return 0


def _outputs(p, name: str) -> None:
    p.add_argument("--out", default=f"runs/bench-{name}", help="folder for the JSON and PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--{what} needs at least one positive integer; got {text!r}")
    return values


def _log(args):
    return None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))


def run_memory(args) -> int:
    from glasslstm.bench.memory import (
        memory_bench,
        plot_curves,
        plot_memory,
        runs_table,
        runs_to_json,
    )

    options.check_args(args, MEMORY_OPTIONS)
    Ts = _ints(args.T, "T")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown or not models:
        raise ConfigError(f"--models must name some of {', '.join(MODELS)}; got {args.models!r}")
    try:
        runs = memory_bench(
            args.task,
            Ts,
            models,
            budget=args.budget,
            seed=args.seed,
            batch_size=args.batch_size,
            hidden_size=args.hidden,
            lr=args.lr,
            init=args.init,
            log=_log(args),
        )
    except ValueError as e:  # e.g. a T below the task's minimum
        raise ConfigError(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "task": args.task,
        "budget": args.budget,
        "seed": args.seed,
        "init": args.init,
        "runs": runs_to_json(runs),
    }
    (out / f"memory-{args.task}.json").write_text(json.dumps(data, indent=2))
    png = plot_memory(runs, out / f"memory-{args.task}.png")
    curves = plot_curves(runs, out / f"memory-{args.task}-curves.png")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(runs_table(runs))
        print(f"\nwrote {out / f'memory-{args.task}.json'}, {png} and {curves}")
    return 0


def run_gradient(args) -> int:
    from glasslstm.bench.memory import gradient_bench, plot_gradients

    options.check_args(args, GRADIENT_OPTIONS)
    try:
        result = gradient_bench(
            args.task,
            args.T,
            budget=args.budget,
            hidden_size=args.hidden,
            seed=args.seed,
            log=_log(args),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gradient-{args.task}.json").write_text(json.dumps(result, indent=2))
    png = plot_gradients(result, out / f"gradient-{args.task}.png")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"||dL/dh_t|| (mean per sequence), {args.task}, T={args.T}:")
        print(f"{'model':6} {'distance':>9} {'at init':>10} {'trained':>10}")
        for kind, res in result["models"].items():
            for k in sorted({0, 1, 10, args.T // 2, args.T - 1}):
                print(f"{kind:6} {k:9d} {res['init']['h'][k]:10.2e} {res['trained']['h'][k]:10.2e}")
        print(f"\nwrote {out / f'gradient-{args.task}.json'} and {png}")
    return 0

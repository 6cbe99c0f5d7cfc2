"""glasslstm bench: the long-term-memory claim measured (memory), the vanishing gradient, and
speed against torch.nn.LSTM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from glasslstm import options
from glasslstm.bench.memory import (
    INITS,
    MODELS,
    gradient_bench,
    memory_bench,
    plot_curves,
    plot_gradients,
    plot_memory,
    runs_table,
    runs_to_json,
)
from glasslstm.errors import ConfigError
from glasslstm.tasks import TASKS

POSITIVE = options.integer(1)
MEMORY_OPTIONS = {
    "budget": POSITIVE,
    "batch_size": POSITIVE,
    "hidden": POSITIVE,
    "lr": options.number(0, low_open=True),
    "seed": options.SEED,
}
GRADIENT_OPTIONS = {"T": POSITIVE, "budget": POSITIVE, "hidden": POSITIVE, "seed": options.SEED}
SPEED_OPTIONS = {
    "T": POSITIVE,
    "batch_size": POSITIVE,
    "reps": POSITIVE,
    "gen_tokens": POSITIVE,
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
    m.add_argument("--task", choices=TASKS, default="adding")
    m.add_argument("--T", default="50,100,200", help="comma-separated dependency lengths")
    m.add_argument("--models", default=",".join(MODELS), help="comma-separated: lstm,gru,rnn")
    m.add_argument("--budget", type=int, default=50_000, help="training sequences per model")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--hidden", type=int, default=128)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument(
        "--init",
        choices=INITS,
        default="forget1",
        help="the LSTM's gate biases: forget1 (forget bias 1, the default) or chrono "
        "(Tallec & Ollivier 2018: forget biases log U[1, L-1], L the sequence length)",
    )
    m.add_argument("--seed", type=int, default=0)
    _outputs(m, "memory")
    m.set_defaults(run=run_memory)

    g = kinds.add_parser(
        "gradient",
        help="plot log ||dL/dh_t|| against T - t for RNN, GRU, LSTM",
        description="Gradient norms at every distance, at initialisation and "
        "after training, and the LSTM's gradient along the cell path.",
    )
    g.add_argument("--task", choices=TASKS, default="adding")
    g.add_argument("--T", type=int, default=100)
    g.add_argument(
        "--budget",
        type=int,
        default=20_000,
        help="training sequences before the second measurement",
    )
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    _outputs(g, "gradient")
    g.set_defaults(run=run_gradient)

    _add_speed(kinds)
    _add_onnx(kinds)
    _add_gemm(kinds)


def _add_gemm(kinds) -> None:
    k = kinds.add_parser(
        "gemm",
        help="which matrix-product implementation this machine uses, measured afresh",
        description="Time each candidate (torch's BLAS, oneDNN's micro-kernel) for the "
        "products of an LSTM of each hidden size, store the faster for later runs, and print "
        "the times. Run it on a quiet machine: the choice stays until it is run again.",
    )
    k.add_argument("--sizes", default="128,512,1024", help="comma-separated hidden sizes (I = H)")
    k.add_argument("--batch-size", type=int, default=32, help="rows of the batch (default: 32)")
    k.set_defaults(run=run_gemm)


def _add_onnx(kinds) -> None:
    o = kinds.add_parser(
        "onnx",
        help="text generation with onnxruntime (exported model) beside glasslstm's Stream",
        description=onnx_doc(),
    )
    o.add_argument(
        "run_dir",
        nargs="?",
        metavar="RUN",
        help="a run directory (default: a random char model of --layers x --hidden)",
    )
    o.add_argument("--layers", type=int, default=2, help="random model's layers (default: 2)")
    o.add_argument("--hidden", type=int, default=256, help="random model's hidden size (256)")
    o.add_argument("--tokens", type=int, default=300, help="tokens per timed run (default: 300)")
    o.add_argument("--reps", type=int, default=5, help="timed repetitions (default: 5)")
    o.add_argument("--threads", type=int, default=1, help="threads for each runtime (default: 1)")
    _outputs(o, "onnx")
    o.set_defaults(run=run_onnx)


def onnx_doc() -> str:
    from glasslstm.bench import onnx

    return onnx.__doc__


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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx.json").write_text(json.dumps(res, indent=2, default=str))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(onnx_table(res))
        print(f"\nwrote {out / 'onnx.json'}")
    return 0


def run_gemm(args) -> int:
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
        print("note: other work held the cores; threaded products were measured but not stored")
    return 0


def _add_speed(kinds) -> None:
    s = kinds.add_parser(
        "speed",
        help="glasslstm vs torch.nn.LSTM: training, inference, batch-1 step, generation",
        description=speed_doc(),
    )
    s.add_argument("--sizes", default="128,512,1024", help="comma-separated hidden sizes (I = H)")
    s.add_argument("--T", type=int, default=100, help="sequence length for train/infer")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--reps", type=int, default=5, help="timed repetitions per contender")
    s.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    s.add_argument("--gen-tokens", type=int, default=300, help="tokens generated per model")
    s.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke test")
    _outputs(s, "speed")
    s.set_defaults(run=run_speed)


def speed_doc() -> str:
    from glasslstm.bench import speed

    return speed.__doc__


def run_speed(args) -> int:
    from glasslstm.bench.speed import speed_bench, speed_table

    options.check_args(args, SPEED_OPTIONS)
    sizes = _ints(args.sizes, "sizes")
    options.resolve_device(args.device)
    kw = dict(
        sizes=sizes,
        T=args.T,
        B=args.batch_size,
        reps=args.reps,
        device=args.device,
        gen_tokens=args.gen_tokens,
    )
    if args.quick:
        kw.update(
            sizes=[16], T=8, B=4, reps=1, step_calls=20, gen_tokens=10, gen_layers=1, gen_hidden=16
        )
    log = _log(args)
    res = speed_bench(progress=log or (lambda line: None), **kw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(res, indent=2, default=str))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(speed_table(res))
        print(f"\nwrote {out / 'speed.json'}")
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

"""glasslstm export: a trained model as a file other runtimes run (ONNX)."""

from __future__ import annotations

import json
from pathlib import Path

from glasslstm.model import LanguageModel


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained model as an ONNX file (for onnxruntime and other runtimes)",
        description="Write the language model of RUN as an ONNX graph: inputs tokens "
        "(batch, time) int64, h0 and c0 (layers, batch, size), outputs logits (batch, time, "
        "vocabulary), h_n and c_n; batch and time are dynamic, so one file serves whole "
        "sequences and one token at a time with the state carried. Layers become ONNX's LSTM "
        "operator (projected or float64 layers: a Scan of plain operators); the vocabulary "
        "travels in the file's metadata. The file is then checked against the model with "
        "onnxruntime. Needs: pip install glasslstm[export].",
    )
    p.add_argument(
        "run_dir",
        metavar="RUN",
        help="a run directory (from `glasslstm train` or LanguageModel.save)",
    )
    p.add_argument("--format", choices=("onnx",), default="onnx", help="file format (onnx)")
    p.add_argument("--out", default="model.onnx", help="the file to write (default: model.onnx)")
    p.add_argument("--which", choices=("best", "last"), default="best", help="which saved model")
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip running the file with onnxruntime against the model",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from glasslstm import export

    model = LanguageModel.load(args.run_dir, which=args.which)
    path = export.to_onnx(model, args.out)
    info = export.describe(path)
    worst = export.compare(model, path) if args.check else None
    info.pop("metadata")
    out = {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        **info,
        "max_abs_difference": worst,
        "tolerance": export.tolerance(export.weight_dtype(model.lstm)),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        ops = out["operators"]
        layers = (
            f"{ops.get('LSTM', 0)} ONNX LSTM node(s), {ops.get('Scan', 0)} Scan loop(s) of "
            "plain operators"
        )
        print(f"wrote {path} ({out['bytes'] / 1e6:.1f} MB, opset {out['opset']}): {layers}")
        for kind in ("inputs", "outputs"):
            shown = ", ".join(f"{n} {tuple(s)}" for n, s in out[kind].items())
            print(f"  {kind:8} {shown}")
        if worst is not None:
            verdict = "ok" if worst <= out["tolerance"] else "TOO LARGE"
            print(
                f"  checked with onnxruntime at (batch, time) = (1, 1), (2, 5), (3, 17): "
                f"max |difference| {worst:.2e} ({verdict}; tolerance {out['tolerance']:.0e})"
            )
    if worst is not None and worst > out["tolerance"]:
        return 1
    return 0

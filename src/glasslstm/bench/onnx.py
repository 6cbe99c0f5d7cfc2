"""`glasslstm bench onnx`: generating text from a language model exported to ONNX, with
onnxruntime, beside glasslstm's own :class:`~glasslstm.LMStream` on the same weights.

Both run one token at a time with the LSTM state carried, as a service generating text would:

* ``generate`` — tokens/s of a whole generation (``--tokens`` tokens after a one-character
  prompt, sampling at temperature 1 included): glasslstm's ``LanguageModel.generate`` (the C++
  step through every layer, then the output layer) against
  :class:`glasslstm.onnx_generate.OnnxLanguageModel`'s ``generate`` (one ``session.run`` per
  token: ``tokens`` (1, 1), ``h0``, ``c0`` in; ``logits``, ``h_n``, ``c_n`` out; NumPy samples).
* ``step`` — microseconds per token without sampling: ``LMStream.step(token)`` against
  ``session.run`` with the state fed back.

The four timings run one after the other inside every repetition, in an order rotated from
one repetition to the next; the figures are medians over the repetitions, and the ratio is the
median (and range) of the per-repetition ratios. torch and onnxruntime get the same number of
threads (``--threads``; onnxruntime's inter-op pool is 1). The model: a run directory's, or a random
char model of ``--layers`` x ``--hidden`` (65 tokens; speed does not depend on the weights).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glasslstm.bench.timing import machine_info, median


def random_char_model(layers: int, hidden: int):
    """A char language model of 65 tokens (tiny-shakespeare's count), random weights."""
    from glasslstm.data import CharTokenizer
    from glasslstm.model import LanguageModel, ModelConfig

    tok = CharTokenizer([chr(c) for c in range(32, 97)])
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_layers=layers)
    return LanguageModel(cfg, tok).eval()


def onnx_bench(model, tokens: int = 300, reps: int = 5, threads: int = 1, progress=print) -> dict:
    """Time ``model`` (a LanguageModel on the CPU) and its ONNX export; a JSON-ready dict."""
    from glasslstm.export import require, to_onnx
    from glasslstm.onnx_generate import OnnxLanguageModel

    require("onnx", "onnxscript", "onnxruntime")
    import onnxruntime

    torch.set_num_threads(threads)
    model = model.cpu().eval()
    out: dict[str, Any] = {"machine": machine_info(torch.device("cpu"))}
    out["machine"]["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        progress("exporting ...")
        to_onnx(model, path)
        out["onnx_bytes"] = path.stat().st_size
        ort_lm = OnnxLanguageModel(path, threads=threads)
        prompt = model.require_tokenizer().decode([model.default_start_id()])

        def ours_generate():
            return sum(1 for _ in model.generate(prompt, tokens, temperature=1.0, seed=0))

        def ort_generate():
            return sum(1 for _ in ort_lm.generate(prompt, tokens, temperature=1.0, seed=0))

        stream = model.stream()
        state = ort_lm.initial_state()
        feed = np.zeros((1, 1), dtype=np.int64)
        V = model.config.vocab_size

        def ours_step():
            for i in range(tokens):
                stream.step(i % V)

        def ort_step():
            h, c = state
            for i in range(tokens):
                feed[0, 0] = i % V
                _, h, c = ort_lm.session.run(None, {"tokens": feed, "h0": h, "c0": c})

        ours_generate(), ort_generate(), ours_step(), ort_step()  # warm-up
        contenders = [
            ("gen_ours", ours_generate),
            ("gen_ort", ort_generate),
            ("step_ours", ours_step),
            ("step_ort", ort_step),
        ]
        times: dict[str, list[float]] = {key: [] for key, _ in contenders}
        with torch.no_grad():
            for r in range(reps):
                progress(f"repetition {r + 1}/{reps} ...")
                for key, fn in contenders[r % 4 :] + contenders[: r % 4]:  # order rotated
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)

    def ratio(ours: str, theirs: str) -> dict:
        """onnxruntime's speed over glasslstm's, per repetition: median and range."""
        r = [a / b for a, b in zip(times[ours], times[theirs])]
        return {"median": median(r), "min": min(r), "max": max(r)}

    gen_ours, gen_ort = median(times["gen_ours"]), median(times["gen_ort"])
    step_ours, step_ort = median(times["step_ours"]), median(times["step_ort"])
    cfg = model.config
    out |= {
        "model": f"{cfg.num_layers}x{cfg.hidden_size} {model.require_tokenizer().level} LM, "
        f"{cfg.vocab_size} tokens",
        "tokens": tokens,
        "reps": reps,
        "threads": threads,
        "generate": {
            "glasslstm (LMStream)": {"tokens_per_s": tokens / gen_ours},
            "onnxruntime": {"tokens_per_s": tokens / gen_ort},
            "onnxruntime / glasslstm": ratio("gen_ours", "gen_ort"),
        },
        "step": {
            "glasslstm (LMStream)": {"us": step_ours / tokens * 1e6},
            "onnxruntime": {"us": step_ort / tokens * 1e6},
            "onnxruntime / glasslstm": ratio("step_ours", "step_ort"),
        },
    }
    if hasattr(os, "getloadavg"):  # other work on a shared machine shows up here
        out["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return out


def onnx_table(res: dict) -> str:
    """The figures as a markdown table."""
    m = res["machine"]
    load = f"load average {m.get('loadavg_1m_at_start')} -> {m.get('loadavg_1m_at_end')}"
    lines = [
        f"CPU: {m.get('cpu')}, {res['threads']} thread(s) each, {load}; torch {m.get('torch')}, "
        f"onnxruntime {m.get('onnxruntime')}; {res['model']}, "
        f"{res['tokens']} tokens, median of {res['reps']}",
        "",
        "| | glasslstm (LMStream) | onnxruntime | onnxruntime's speed / glasslstm's (range) |",
        "|---|---:|---:|---:|",
    ]

    def rel(r: dict) -> str:
        return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"

    g, s = res["generate"], res["step"]
    lines.append(
        f"| generate, tokens/s | {g['glasslstm (LMStream)']['tokens_per_s']:,.0f} "
        f"| {g['onnxruntime']['tokens_per_s']:,.0f} | {rel(g['onnxruntime / glasslstm'])} |"
    )
    lines.append(
        f"| one step, us/token | {s['glasslstm (LMStream)']['us']:.1f} "
        f"| {s['onnxruntime']['us']:.1f} | {rel(s['onnxruntime / glasslstm'])} |"
    )
    return "\n".join(lines)

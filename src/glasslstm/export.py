"""ONNX export: a :class:`glasslstm.LSTM` or :class:`glasslstm.LanguageModel` as a standard
ONNX graph that onnxruntime (or any ONNX runtime) runs without Python's training stack.

    from glasslstm.export import to_onnx
    to_onnx(lstm, "lstm.onnx")     # inputs input, h0, c0 -> outputs output, h_n, c_n
    to_onnx(model, "model.onnx")   # inputs tokens, h0, c0 -> outputs logits, h_n, c_n

How: ``torch.onnx.export(..., dynamo=True)`` traces the module with ``torch.export``; on the
CPU every layer and direction is one call of glasslstm's operator
``torch.ops.glasslstm.lstm_layer``, which :func:`_lstm_layer` translates (the exporter's
``custom_translation_table``):

* a layer without projection becomes ONNX's own ``LSTM`` operator. Its gates are stacked in
  the order i, o, f, c where torch's rows are i, f, g, o, so the rows of ``weight_ih`` (ONNX's
  ``W``), ``weight_hh`` (``R``) and both biases (``B`` = [Wb, Rb]) are permuted; a reverse
  direction is ``direction="reverse"``. One node per layer and direction (a bidirectional layer
  is a forward and a reverse node whose outputs are concatenated, as glasslstm computes it);
* a layer with ``proj_size`` (LSTMP: ``H_t = W_hr (o_t * tanh(C_t))``) has no ONNX operator,
  so it becomes plain operators: the input projection of all steps as one ``MatMul``, then a
  ``Scan`` over time whose body is the cell (``MatMul``, ``Split``, ``Sigmoid``, ``Tanh``,
  ``Mul``, ``Add``, and the projection ``MatMul``).

Weights are re-laid out once at export (the permutations and transposes are folded into the
stored tensors), batch and time are dynamic axes, and the state goes in and out, so one file
serves a whole sequence, a batch, or one token at a time with the state carried
(:mod:`glasslstm.onnx_generate` generates text that way with onnxruntime and NumPy alone).

A language model's file also carries its tokenizer and sizes as metadata (``glasslstm.vocab``,
``glasslstm.model``), so the ``.onnx`` file is all a runtime needs.

Needs the optional dependencies ``onnx``, ``onnxscript`` (the exporter) and, to check or run
the result, ``onnxruntime``: ``pip install glasslstm[export]``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from glasslstm import rundir
from glasslstm.errors import ConfigError
from glasslstm.lstm import LSTM
from glasslstm.model import LanguageModel
from glasslstm.ops import native

INSTALL_HINT = "pip install glasslstm[export]"
OPSET = 18  # the opset torch's ONNX function library is written for; LSTM and Scan both in it
KIND_KEY, CONFIG_KEY = "glasslstm.kind", "glasslstm.config"
MODEL_KEY, VOCAB_KEY = "glasslstm.model", "glasslstm.vocab"
# Example sizes the graph is traced at: above 1, so that nothing specialises on a batch or a
# sequence of one (the axes stay dynamic; a one-token call takes another path in eager mode).
_EXAMPLE_BATCH, _EXAMPLE_TIME = 2, 3


def require(*modules: str) -> None:
    """Import each of ``modules`` or raise a one-line ConfigError naming the extra to install."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: {INSTALL_HINT}"
        )


# ---- the modules that are traced -----------------------------------------------------------------


class _LSTMGraph(nn.Module):
    """``(input, h0, c0) -> (output, h_n, c_n)``: the LSTM with its state as plain tensors."""

    def __init__(self, lstm: LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, input, h0, c0):
        output, (h_n, c_n) = self.lstm(input, (h0, c0))
        return output, h_n, c_n


class _LanguageModelGraph(nn.Module):
    """``(tokens, h0, c0) -> (logits, h_n, c_n)``: the language model, state in and out."""

    def __init__(self, model: LanguageModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, h0, c0):
        logits, _, (h_n, c_n) = self.model(tokens, (h0, c0))
        return logits, h_n, c_n


def check_exportable(model: nn.Module) -> LSTM:
    """``model``'s glasslstm.LSTM, or a ConfigError saying why ``model`` cannot be exported."""
    if isinstance(model, LanguageModel):
        lstm = model.lstm
    elif isinstance(model, LSTM):
        lstm = model
    else:
        raise ConfigError(
            f"to_onnx exports a glasslstm.LSTM or a glasslstm.LanguageModel; got "
            f"{type(model).__name__} (for torch.nn.LSTM, use torch.onnx.export directly)"
        )
    if not isinstance(lstm, LSTM):
        raise ConfigError(
            f"the language model's LSTM is a {type(lstm).__name__}, not a glasslstm.LSTM; "
            "export needs glasslstm's LSTM inside"
        )
    if not lstm.plain_cell:
        raise ConfigError(
            "ONNX export maps the article's cell to ONNX's LSTM operator, which has no layer "
            "normalisation, zoneout or clipping of the cell state itself, and the exporter does "
            "not map peepholes; export a model trained without --layer-norm, --peephole, "
            "--cell-clip, --zoneout-c and --zoneout-h (the dropouts are no obstacle)"
        )
    dtype = weight_dtype(lstm)
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(
            f"the model's weights are {dtype}; ONNX export takes float32 or float64: "
            "convert it with .float() first"
        )
    if not native.available():
        raise ConfigError(
            f"ONNX export traces glasslstm's C++ operators, which are not available here "
            f"({native.status()}); install a C++ compiler (g++) and retry"
        )
    return lstm


def _exportable_copy(model: nn.Module) -> tuple[nn.Module, LSTM]:
    """A CPU copy of ``model`` in eval mode whose LSTM runs the C++ operator (the one form the
    exporter maps to ONNX), and that LSTM."""
    check_exportable(model)
    copied = copy.deepcopy(model).cpu().eval()
    inner = copied.lstm if isinstance(copied, LanguageModel) else copied
    assert isinstance(inner, LSTM)
    inner.backend = "fused"  # the operator, whatever the original asks for (same numbers)
    return copied, inner


def _graph_module(model: nn.Module) -> tuple[nn.Module, LSTM, tuple, dict, list[str], list[str]]:
    """What torch.onnx.export takes: the module to trace, example inputs, dynamic shapes and
    the names of the graph's inputs and outputs."""
    copied, lstm = _exportable_copy(model)
    B, T = _EXAMPLE_BATCH, _EXAMPLE_TIME
    batch, time = torch.export.Dim("batch", min=1), torch.export.Dim("time", min=1)
    LD = lstm.num_layers * lstm.num_directions
    dtype = weight_dtype(lstm)
    h0 = torch.zeros(LD, B, lstm.out_size, dtype=dtype)
    c0 = torch.zeros(LD, B, lstm.hidden_size, dtype=dtype)
    state_axes = {1: batch}
    if isinstance(copied, LanguageModel):
        tokens = torch.zeros(B, T, dtype=torch.long)
        return (
            _LanguageModelGraph(copied).eval(),
            lstm,
            (tokens, h0, c0),
            {"tokens": {0: batch, 1: time}, "h0": state_axes, "c0": state_axes},
            ["tokens", "h0", "c0"],
            ["logits", "h_n", "c_n"],
        )
    shape = (B, T) if lstm.batch_first else (T, B)
    x = torch.zeros(*shape, lstm.input_size, dtype=dtype)
    axes = {0: batch, 1: time} if lstm.batch_first else {0: time, 1: batch}
    return (
        _LSTMGraph(lstm).eval(),
        lstm,
        (x, h0, c0),
        {"input": axes, "h0": state_axes, "c0": state_axes},
        ["input", "h0", "c0"],
        ["output", "h_n", "c_n"],
    )


def weight_dtype(lstm: nn.Module) -> torch.dtype:
    """The dtype of ``lstm``'s weights (float32 or float64 where exportable)."""
    return next(lstm.parameters()).dtype


def lstm_config(lstm: LSTM) -> dict:
    """The sizes a runtime needs to build the state: stored as ``glasslstm.config``."""
    return {
        "input_size": lstm.input_size,
        "hidden_size": lstm.hidden_size,
        "proj_size": lstm.proj_size,
        "num_layers": lstm.num_layers,
        "num_directions": lstm.num_directions,
        "batch_first": lstm.batch_first,
        "dtype": str(weight_dtype(lstm)).removeprefix("torch."),
    }


# ---- export --------------------------------------------------------------------------------------


def to_onnx(model: nn.Module, path) -> Path:
    """Write ``model`` (a :class:`~glasslstm.LSTM` or :class:`~glasslstm.LanguageModel`) to the
    ONNX file ``path`` (replaced atomically); returns the path.

    The graph (opset 18):

    * LSTM: inputs ``input`` ((T, B, I), or (B, T, I) when ``batch_first``), ``h0`` (L*D, B, P)
      and ``c0`` (L*D, B, H); outputs ``output``, ``h_n``, ``c_n``, as ``lstm(input, (h0, c0))``
      returns them (L layers, D directions, P = proj_size or H).
    * LanguageModel: inputs ``tokens`` (B, T) int64, ``h0``, ``c0``; outputs ``logits``
      (B, T, V), ``h_n``, ``c_n``. The tokenizer and model config are in the file's metadata.

    B and T are dynamic; the state inputs are required (zeros for a fresh start). Inference
    only: the graph is the model in eval mode (no dropout). :func:`compare` checks the file
    against the model with onnxruntime.
    """
    check_exportable(model)
    require("onnx", "onnxscript")
    import onnxscript.optimizer

    from glasslstm import export_onnx

    path = Path(path)
    module, lstm, args, dynamic, in_names, out_names = _graph_module(model)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=dynamic,
            custom_translation_table={
                torch.ops.glasslstm.lstm_layer.default: export_onnx.lstm_layer
            },
            optimize=False,
            verbose=False,
        )
        assert program is not None  # dynamo=True always returns the program
        # Fold every constant expression, however large: the weights' gate permutations and
        # transposes, so the file stores them laid out as the operators read them.
        onnxscript.optimizer.optimize(
            program.model, input_size_limit=2**40, output_size_limit=2**40
        )
    meta = {KIND_KEY: "lstm", CONFIG_KEY: json.dumps(lstm_config(lstm))}
    if isinstance(model, LanguageModel):
        meta[KIND_KEY] = "language-model"
        meta[MODEL_KEY] = json.dumps(model.config_dict())
        if model.tokenizer is not None:
            meta[VOCAB_KEY] = json.dumps(model.tokenizer.to_dict())
    program.model.metadata_props.update(meta)
    program.model.producer_name = "glasslstm"
    proto = program.model_proto
    if proto.ByteSize() >= 2**31:
        raise ConfigError(
            f"the model is {proto.ByteSize() / 2**30:.1f} GiB, over the 2 GiB an ONNX file can "
            "hold; export a smaller model"
        )
    rundir.atomic_write_bytes(path, proto.SerializeToString())
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines, its note that torchvision is absent and its deprecation
    warnings from torch's own internals are not the user's business; real errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # names given to dynamic axes: the exporter keeps one name per shared size
            warnings.filterwarnings("ignore", "# The axis name", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---- checking against onnxruntime ----------------------------------------------------------------


def tolerance(dtype: torch.dtype) -> float:
    """The largest difference accepted between the model and its ONNX file: 1e-5 in float32
    (the test suite's bound), 1e-10 in float64."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def session(path, threads: int | None = None):
    """An onnxruntime InferenceSession for ``path`` on the CPU (``threads``: intra-op threads,
    None: onnxruntime's choice)."""
    require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def compare(model: nn.Module, path, sizes=((1, 1), (2, 5), (3, 17)), seed: int = 0) -> float:
    """The largest absolute difference, over every output and each (batch, time) in
    ``sizes``, between ``model`` (eval mode, random inputs and a random initial state) and the
    ONNX file ``path`` run by onnxruntime."""
    sess = session(path)
    module, lstm, *_ = _graph_module(model)
    gen = torch.Generator().manual_seed(seed)
    dtype = weight_dtype(lstm)
    LD = lstm.num_layers * lstm.num_directions
    worst = 0.0
    for B, T in sizes:
        h0 = torch.randn(LD, B, lstm.out_size, generator=gen, dtype=dtype)
        c0 = torch.randn(LD, B, lstm.hidden_size, generator=gen, dtype=dtype)
        if isinstance(model, LanguageModel):
            first = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
            feeds = {"tokens": first}
        else:
            shape = (B, T) if lstm.batch_first else (T, B)
            feeds = {"input": torch.randn(*shape, lstm.input_size, generator=gen, dtype=dtype)}
        feeds |= {"h0": h0, "c0": c0}
        with torch.no_grad():
            expected = module(*feeds.values())
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        for e, g in zip(expected, got):
            worst = max(worst, float(np.abs(e.numpy() - g).max()))
    return worst


def describe(path) -> dict:
    """What an exported file holds: ``{"opset", "inputs", "outputs" (name -> shape, a name
    for each dynamic axis), "operators" (op type -> count, Scan bodies not counted),
    "metadata"}``."""
    require("onnx")
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)

    def shape(value) -> list:
        dims = value.type.tensor_type.shape.dim
        return [d.dim_param or d.dim_value for d in dims]

    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": {v.name: shape(v) for v in proto.graph.input},
        "outputs": {v.name: shape(v) for v in proto.graph.output},
        "operators": dict(sorted(counts.items())),
        "metadata": {p.key: p.value for p in proto.metadata_props},
    }

"""Reading a run directory's files, each value checked before it is used.

:mod:`glasslstm.rundir` stores and fetches (atomic writes, safetensors, JSON); this module
decides whether what it fetched can be used: config.json's sections against the same rules
as the options (:mod:`glasslstm.options`), vocab.json against config.json, every weights
file's tensor names, shapes and dtypes against the model config.json describes, read from
the file's header before any tensor is loaded, then its values (no NaN or infinity), and the
resume point (progress, optimizer moments, RNG states, carried LSTM state) against the model
and optimizer it is about to be loaded into. Each problem is one
:class:`~glasslstm.errors.RunDirError` line naming the file, the key, what was found and
what was expected. :func:`read_model` is what :meth:`LanguageModel.load` (and so every
command, ``serve`` included) goes through.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from glasslstm import options, rundir
from glasslstm.data import Corpus, Tokenizer, load_corpus, tokenizer_from_dict
from glasslstm.errors import (
    ConfigError,
    DataError,
    GlassLSTMError,
    InvalidValue,
    RunDirError,
    WriteError,
)
from glasslstm.model import ModelConfig

CONFIG, VOCAB = "config.json", "vocab.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what a weight may be stored as; loaded as float32


# What to do about a file that cannot be used (the run directory itself is left as it is).
RESTORE = "restore it from a copy, or train a new run (`glasslstm train --out NEW_DIR`)"


def _shown(value: Any) -> str:
    """A value as JSON writes it, cut to a readable length."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad_key(path, key: str, found: Any, expected: str, fix: str) -> RunDirError:
    return RunDirError(
        f"{path}: {key!r} is {_shown(found)}; expected {expected}. The file is damaged or was "
        f"edited: {fix}"
    )


def _missing_key(path, key: str, expected: str, fix: str) -> RunDirError:
    return RunDirError(
        f"{path}: {key!r} is missing; expected {expected}. The file is damaged or was edited: {fix}"
    )


# ------------------------------------------------------------------------ config.json

CORPUS = {
    "name": options.Rule("text"),
    "source": options.Rule("text"),
    "train_tokens": options.integer(0),
    "val_tokens": options.integer(0),
    "sha256": options.Rule("text", optional=True),
    "test_tokens": options.integer(0, optional=True),
}
SPLIT_NAMES = ("train", "valid", "test")  # the keys of corpus.files: split -> its file

# Model fields and the training options they come from; config.json's two must agree.
_MODEL_FROM_TRAIN = {
    "hidden_size": "hidden",
    "num_layers": "layers",
    "dropout": "dropout",
    "embed_size": "embed",
    "tie_weights": "tie_weights",
    "forget_bias": "forget_bias",
}


@dataclass(frozen=True)
class RunConfig:
    """A run's config.json, checked: the raw dict and its sections as objects."""

    path: Path
    raw: dict
    model: ModelConfig
    train: Any  # TrainConfig (glasslstm.trainer imports this module)
    corpus: dict


def _section(path, raw: dict, name: str, fix: str) -> dict:
    if name not in raw:
        raise _missing_key(path, name, f"the {name} section (an object)", fix)
    if not isinstance(raw[name], dict):
        raise _bad_key(path, name, raw[name], f"an object (the {name} section)", fix)
    return raw[name]


def _dataclass_from(cls, section: dict, name: str, path, fix: str):
    """``cls.from_dict(section)`` with every problem reported against ``path`` and the key."""
    for f in fields(cls):
        if f.default is MISSING and f.name not in section:
            raise _missing_key(path, f"{name}.{f.name}", "a value (it has no default)", fix)
    try:
        return cls.from_dict(section)
    except InvalidValue as e:
        raise _bad_key(path, f"{name}.{e.key}", e.found, e.expected, fix) from None
    except ConfigError as e:
        raise RunDirError(
            f"{path}: in {name!r}: {e}. The file is damaged or was edited: {fix}"
        ) from None


def read_run_config(run_dir) -> RunConfig:
    """RUN/config.json with its model, train and corpus sections checked (types, ranges, and
    that the model is the one the training options describe)."""
    run_dir = Path(run_dir)
    raw = rundir.read_config(run_dir)
    path, fix = run_dir / CONFIG, RESTORE
    from glasslstm.trainer import TrainConfig

    model = _dataclass_from(ModelConfig, _section(path, raw, "model", fix), "model", path, fix)
    train = _dataclass_from(TrainConfig, _section(path, raw, "train", fix), "train", path, fix)
    corpus = _section(path, raw, "corpus", fix)
    for key, rule in CORPUS.items():
        if key not in corpus and not rule.optional:
            raise _missing_key(path, f"corpus.{key}", rule.expected(), fix)
        expected = rule.problem(corpus.get(key))
        if expected is not None:
            raise _bad_key(path, f"corpus.{key}", corpus[key], expected, fix)
    files = corpus.get("files", {})
    if not isinstance(files, dict) or not all(
        k in SPLIT_NAMES and isinstance(v, str) for k, v in files.items()
    ):
        raise _bad_key(
            path, "corpus.files", files, "an object of train, valid, test -> file path", fix
        )
    for model_key, train_key in _MODEL_FROM_TRAIN.items():
        if getattr(model, model_key) != getattr(train, train_key):
            raise RunDirError(
                f"{path}: 'model.{model_key}' is {_shown(getattr(model, model_key))} but "
                f"'train.{train_key}' is {_shown(getattr(train, train_key))}; they must agree. "
                f"The file was edited: {fix}"
            )
    return RunConfig(path, raw, model, train, corpus)


# ------------------------------------------------------------------------ vocab.json


def read_vocab(run_dir, vocab_size: int | None = None) -> Tokenizer:
    """RUN/vocab.json as a tokenizer; with ``vocab_size`` (config.json's), it must match."""
    run_dir = Path(run_dir)
    path, fix = run_dir / VOCAB, RESTORE
    if not path.is_file():
        raise RunDirError(f"{path} is missing; the run directory is incomplete: {fix}")
    try:
        tok = tokenizer_from_dict(rundir.read_json(path, fix))
    except DataError as e:
        raise RunDirError(f"{path}: {e}. The file is damaged or was edited: {fix}") from None
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise RunDirError(
            f"{path} lists {tok.vocab_size} tokens but {run_dir / CONFIG} says "
            f"'model.vocab_size' is {vocab_size}; one of them was edited or replaced: {fix}"
        )
    return tok


# ------------------------------------------------------------------------ weights


def check_header(
    path,
    found: Mapping[str, tuple[tuple[int, ...], str]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    of: str,
    fix: str,
    optional: tuple[str, ...] = (),
    dtypes: tuple[str, ...] = FLOAT_DTYPES,
) -> None:
    """Tensors named in a safetensors header (``{name: (shape, dtype)}``) against what ``of``
    (e.g. "config.json's model") has: every name, each shape, a dtype among ``dtypes``."""
    for name, shape in expected.items():
        if name not in found:
            if name in optional:
                continue
            raise RunDirError(
                f"{path}: tensor {name!r} is missing; expected one of shape {shape} for {of}. "
                f"The file does not belong to this run or was edited: {fix}"
            )
        got, dtype = found[name]
        if tuple(got) != tuple(shape):
            raise RunDirError(
                f"{path}: tensor {name!r} has shape {tuple(got)}; expected {tuple(shape)} for "
                f"{of}. The file does not belong to this run or was edited: {fix}"
            )
        if dtype not in dtypes:
            raise RunDirError(
                f"{path}: tensor {name!r} has dtype {dtype}; expected {' or '.join(dtypes)}. "
                f"The file does not belong to this run or was edited: {fix}"
            )
    for name in found:
        if name not in expected:
            raise RunDirError(
                f"{path}: tensor {name!r} is not part of {of} (its tensors are "
                f"{', '.join(list(expected)[:4])}, ...). The file does not belong to this run: "
                f"{fix}"
            )


def check_finite(path, tensors: Mapping[str, torch.Tensor], fix: str) -> None:
    """RunDirError naming the first floating-point tensor with NaN or infinite values."""
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise RunDirError(
                    f"{path}: tensor {name!r} has {bad:,} NaN or infinite value"
                    f"{'s' if bad > 1 else ''} of {t.numel():,}; expected finite numbers. "
                    f"A model with them predicts nothing: {fix}"
                )


@dataclass(frozen=True)
class ModelFiles:
    """What :meth:`LanguageModel.load` needs, all checked against config.json."""

    config: ModelConfig
    tokenizer: Tokenizer | None  # None: saved without one
    weights: dict[str, torch.Tensor]
    path: Path  # the weights file


def read_model_config(run_dir) -> tuple[ModelConfig, bool]:
    """config.json's model section, checked, and whether the directory is a training run's
    (with its train and corpus sections, checked too) rather than one
    ``LanguageModel.save`` wrote (a model section alone)."""
    run_dir = Path(run_dir)
    raw = rundir.read_config(run_dir)
    if "train" in raw or "corpus" in raw:
        return read_run_config(run_dir).model, True
    path = run_dir / CONFIG
    section = _section(path, raw, "model", RESTORE)
    return _dataclass_from(ModelConfig, section, "model", path, RESTORE), False


def read_model(run_dir, which: str = "best", device: torch.device | None = None) -> ModelFiles:
    """config.json, vocab.json and the weights (``best/model.safetensors`` if ``which`` is
    "best" and it exists, else ``model.safetensors``), each checked before the next is read;
    the weights' header before any tensor, and whether the model fits in ``device``'s memory."""
    run_dir = Path(run_dir)
    model_config, trained = read_model_config(run_dir)
    # a training run always has its vocabulary; a model saved without a tokenizer has none
    tok = (
        read_vocab(run_dir, model_config.vocab_size)
        if trained or (run_dir / VOCAB).exists()
        else None
    )
    path = run_dir / "best" / "model.safetensors"
    if which == "last" or not path.is_file():
        path = run_dir / "model.safetensors"
    if not path.is_file():
        raise RunDirError(f"{path} is missing: the run in {run_dir} has not saved a model yet")
    fix = (
        "load the latest weights instead (--which last), restore the file, or train again"
        if path.parent.name == "best"
        else RESTORE
    )
    m = model_config
    shapes = options.parameter_shapes(
        m.vocab_size,
        m.hidden_size,
        m.num_layers,
        embed_size=m.embed_size,
        proj_size=m.proj_size,
        layer_norm=m.layer_norm,
        peephole=m.peephole,
    )
    of = (
        f"config.json's model (vocab_size {m.vocab_size}, hidden_size {m.hidden_size}, "
        f"num_layers {m.num_layers})"
    )
    optional = ("head.weight",) if m.tie_weights else ()
    check_header(path, rundir.read_tensor_header(path), shapes, of=of, fix=fix, optional=optional)
    options.check_memory(
        options.model_memory(shapes, tie_weights=m.tie_weights),
        device or torch.device("cpu"),
        what=f"loading {path}",
        fix="load it on a machine with more memory",
    )
    weights = rundir.load_tensors(path)
    check_finite(path, weights, fix)
    return ModelFiles(m, tok, weights, path)


# ------------------------------------------------------------------------ the resume point

PROGRESS = {
    "step": options.integer(0),
    "best_val_loss": options.number(optional=True),
    "evals_since_best": options.integer(0),
    "seconds": options.number(0),
    "tokens": options.integer(0),
}


def read_train_state(
    run_dir, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress, batch_size: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """RUN/train_state.safetensors, checked against what it is about to be loaded into:
    ``progress`` (a dataclass: every field present, of its type), the model's weights, the
    optimizer's groups and moments, the RNG states, and the carried LSTM state of
    ``batch_size`` rows. The header first, then the values. Returns ``(tensors, meta)``."""
    run_dir = Path(run_dir)
    path = run_dir / rundir.TRAIN_STATE_TENSORS
    fix = RESTORE
    found, meta = rundir.read_train_state_header(run_dir)
    rules = {f.name: PROGRESS.get(f.name) or options.integer(0) for f in fields(progress)}
    for key, rule in rules.items():
        if key not in meta:
            raise _missing_key(path, f"meta.{key}", rule.expected(), fix)
        expected = rule.problem(meta[key])
        if expected is not None:
            raise _bad_key(path, f"meta.{key}", meta[key], expected, fix)
    for key in ("optimizer", "rng"):
        if not isinstance(meta.get(key), dict):
            raise _bad_key(path, f"meta.{key}", meta.get(key), f"the {key} state (an object)", fix)

    expected = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    lstm: Any = model.lstm  # glasslstm.LSTM, or torch.nn.LSTM in a benchmark
    out, hidden = getattr(lstm, "proj_size", 0) or lstm.hidden_size, lstm.hidden_size
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    carry = {"carry.h": (layers, batch_size, out), "carry.c": (layers, batch_size, hidden)}
    opt_shapes = _optimizer_shapes(path, meta["optimizer"], optimizer, fix)
    of = "the model and optimizer config.json describes"
    ours = {k: v for k, v in found.items() if k.startswith(("model.", "carry.", "state."))}
    check_header(
        path, ours, {**expected, **carry, **opt_shapes}, of=of, fix=fix, optional=tuple(carry)
    )
    if ("carry.h" in found) != ("carry.c" in found):
        raise RunDirError(f"{path}: holds only one of carry.h and carry.c; {fix}")

    tensors, meta = rundir.load_train_state(run_dir)
    check_finite(path, {k: v for k, v in tensors.items() if k in ours}, fix)
    _check_optimizer_groups(path, tensors, meta["optimizer"], optimizer, fix)
    try:
        rundir.check_rng_state(tensors, meta["rng"])
    except RunDirError as e:
        raise RunDirError(f"{path}: {e}") from None
    return tensors, meta


def _optimizer_shapes(path, meta: dict, optimizer, fix: str) -> dict[str, tuple[int, ...]]:
    """The shape each optimizer tensor named in ``meta`` must have: a parameter's shape for
    its moments, one number for its step count."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    keys = meta.get("tensor_keys")
    if not isinstance(keys, dict):
        raise _bad_key(path, "meta.optimizer.tensor_keys", keys, "an object", fix)
    shapes: dict[str, tuple[int, ...]] = {}
    for idx, names in keys.items():
        if not (isinstance(idx, str) and idx.isdigit() and int(idx) < len(params)):
            raise _bad_key(
                path,
                "meta.optimizer.tensor_keys",
                idx,
                f"parameter numbers 0 to {len(params) - 1} (the model has {len(params)})",
                fix,
            )
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _bad_key(path, f"meta.optimizer.tensor_keys.{idx}", names, "names", fix)
        for name in names:
            scalar = name == "step"
            shapes[f"state.{idx}.{name}"] = () if scalar else tuple(params[int(idx)].shape)
    return shapes


def _same_kind(live: Any, saved: Any) -> bool:
    """Whether a saved optimizer hyperparameter can stand where ``live`` stands."""
    if isinstance(live, bool) or live is None:
        return saved is None or isinstance(saved, bool)
    if isinstance(live, (int, float)):
        return options.is_finite_number(saved) or isinstance(saved, torch.Tensor)
    if isinstance(live, tuple):
        return (
            isinstance(saved, tuple)
            and len(saved) == len(live)
            and all(_same_kind(a, b) for a, b in zip(live, saved))
        )
    if isinstance(live, str):
        return isinstance(saved, str)
    return True


def _check_optimizer_groups(path, tensors, meta: dict, optimizer, fix: str) -> None:
    saved = rundir.optimizer_state_from_tensors(tensors, meta)["param_groups"]
    live = optimizer.state_dict()["param_groups"]
    if len(saved) != len(live):
        raise _bad_key(
            path, "meta.optimizer.param_groups", f"{len(saved)} groups", f"{len(live)}", fix
        )
    for g, (ours, theirs) in enumerate(zip(live, saved)):
        if not isinstance(theirs, dict) or theirs.get("params") != ours["params"]:
            raise _bad_key(
                path,
                f"meta.optimizer.param_groups.{g}.params",
                theirs.get("params") if isinstance(theirs, dict) else theirs,
                f"the parameter numbers {ours['params'][0]} to {ours['params'][-1]}",
                fix,
            )
        for key, value in theirs.items():
            if key != "params" and key in ours and not _same_kind(ours[key], value):
                raise _bad_key(
                    path,
                    f"meta.optimizer.param_groups.{g}.{key}",
                    value,
                    f"a value like {_shown(ours[key])}",
                    fix,
                )


# ------------------------------------------------------------------------ the corpus


def corpus_sha256(corpus: Corpus) -> str:
    """The SHA-256 of a corpus's whole text (both splits): what a resumed run must see again."""
    h = hashlib.sha256(corpus.train)
    h.update(corpus.val)
    h.update(corpus.test)  # empty without a test split: the digest of earlier runs stands
    return h.hexdigest()


def load_run_corpus(
    run_dir,
    spec: str | None,
    data_dir: str | None,
    *,
    moved_fix: str,
    splits: Mapping[str, str | None] | None = None,
) -> Corpus:
    """The corpus a run was trained on (``spec``, ``data_dir``, and the split files
    ``splits`` from its config.json); when a path is not there any more, a DataError that
    says so and how to point at its new place (``moved_fix``)."""
    splits = {k: v for k, v in (splits or {}).items() if v is not None}
    try:
        return load_corpus(spec, data_dir=data_dir, seed=0, **splits)
    except DataError:
        paths = list(splits.values()) or (
            [] if spec in (None, "stories", "shakespeare") else [spec]
        )
        gone = [p for p in paths if p is not None and not Path(p).expanduser().exists()]
        if not gone:
            raise
        raise DataError(
            f"the training text of {run_dir}, {', '.join(map(str, gone))}, is not there any "
            f"more; if it moved, {moved_fix}"
        ) from None


def check_resumed_corpus(run_dir, cfg, corpus: Corpus, train_tokens: int, val_tokens: int):
    """A resumed run must see the text it was trained on (same SHA-256, or for runs stored
    before that was recorded, the same token counts). If ``cfg`` names it at a new place
    (``--data``), config.json is updated to that place."""
    run_dir = Path(run_dir)
    stored = read_run_config(run_dir)
    digest = corpus_sha256(corpus)
    known = stored.corpus.get("sha256")
    same = (
        known == digest
        if known is not None
        else (stored.corpus["train_tokens"], stored.corpus["val_tokens"])
        == (train_tokens, val_tokens)
    )
    if not same:
        raise DataError(
            f"{cfg.data or 'stories'} is not the text the run in {run_dir} was trained on "
            f"({'its SHA-256 differs' if known else 'its token counts differ'} from "
            f"{stored.path}'s corpus); resume with that text (--data PATH), or start a new run "
            "on this one"
        )
    train = stored.raw["train"]
    places = ("data", "data_dir", *SPLIT_NAMES)
    now = {key: getattr(cfg, key) for key in places}
    if any(train.get(key) != value for key, value in now.items()) or known is None:
        raw = dict(stored.raw)
        raw["train"] = {**train, **now}
        raw["corpus"] = {**stored.corpus, "source": corpus.source, "sha256": digest}
        if corpus.files:
            raw["corpus"]["files"] = corpus.files
        rundir.write_config(run_dir, raw)


# ------------------------------------------------------------------------ write errors


def after_write_error(run_dir, err: WriteError) -> str:
    """What was kept and how to go on after a failed write in a training run: the step of
    the train state on disk (read from its header), and the command to continue."""
    run_dir = Path(run_dir)
    action = {
        errno.ENOSPC: "free some space",
        errno.EDQUOT: "free some space (or raise your quota)",
        errno.EFBIG: "lift the file size limit",
        errno.EACCES: "make it writable",
        errno.EPERM: "make it writable",
        errno.EROFS: "make it writable",
    }.get(err.errno or 0, "fix the disk")
    try:
        step = rundir.read_train_state_header(run_dir)[1].get("step")
    except GlassLSTMError:
        step = None
    if not isinstance(step, int):
        again = f"remove {run_dir} and train again" if run_dir.exists() else "train again"
        return f"nothing was saved yet: {action}, then {again}"
    return (
        f"the last saved state (step {step}) in {run_dir} is intact: {action}, then continue "
        f"with `glasslstm train --resume {run_dir}`"
    )

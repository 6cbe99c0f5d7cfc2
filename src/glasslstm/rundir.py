"""Run directories: how a training run is stored on disk, and how it is read back safely.

Layout of a run directory (every name is fixed; the directory describes itself)::

    RUN/
      config.json               {"format_version": 1, "kind": "glasslstm-run", model + train config}
      vocab.json                the tokenizer's vocabulary
      model.safetensors         the model's parameters (the state_dict, tensors only)
      train_state.safetensors   the resume point, in one file: model weights, optimizer
                                tensors, RNG states, the carried LSTM state, and (in its
                                metadata) the JSON meta: step, best validation loss, ...
      train_state.json          that JSON meta again, for people to read (never loaded)
      metrics.jsonl             one JSON object per line, appended as training goes
      best/model.safetensors    optional: a copy of the model with the best validation loss

Loading never executes code from a file: tensors are read with safetensors and everything
else is JSON. Nothing here uses Python's object serialization, so a run directory from an
untrusted source can be inspected without risk.

Atomic writes. Every file except metrics.jsonl is replaced atomically: the bytes go to a
temporary file in the same directory (named ``.<name>.<random>.tmp``), which is flushed and
fsynced, then ``os.replace``-d over the target, and finally the directory itself is fsynced so
the rename survives a power loss. A crash at any point (an exception, SIGKILL, power loss)
leaves either the complete old file or the complete new one under the real name. A kill can
leave a stray ``.*.tmp`` file behind; nothing ever reads those, since readers only open the
fixed names above. metrics.jsonl is appended to (one write, flush, fsync per line); a line
cut short by a crash is kept apart from the next one by a newline.

Everything a resume needs is in train_state.safetensors, so one rename replaces all of it at
once: a crash cannot pair new optimizer state with old weights.

A write that fails (a full disk, no permission, an I/O error) raises
:class:`~glasslstm.errors.WriteError` naming the path and the free space there; the file that
was under the real name is left as it was. What is read back is checked before use by
:mod:`glasslstm.runfiles`.
"""

from __future__ import annotations

import errno
import json
import os
import random
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as _st_load_bytes
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save as _st_save_bytes

from glasslstm.errors import RunDirError, WriteError

__all__ = [
    "FORMAT_VERSION",
    "RUN_KIND",
    "RunDirError",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "save_tensors",
    "load_tensors",
    "append_jsonl",
    "trim_metrics",
    "make_dirs",
    "read_json",
    "optimizer_state_to_tensors",
    "optimizer_state_from_tensors",
    "rng_state",
    "set_rng_state",
    "check_rng_state",
    "write_config",
    "read_config",
    "save_train_state",
    "load_train_state",
    "read_train_state_header",
    "read_tensor_header",
]

FORMAT_VERSION = 1
RUN_KIND = "glasslstm-run"

CONFIG_FILE = "config.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
_STATE_KIND_KEY, _STATE_KIND = "kind", "glasslstm-train-state"
_META_KEY = "meta"  # train state metadata entry holding the JSON meta

# Upgrades of config.json from an older format version v to v + 1. Empty while there is only
# version 1; a version below FORMAT_VERSION without an entry here cannot be read.
_MIGRATIONS: dict[int, Callable[[dict], dict]] = {}

_TRAIN_HINT = "`glasslstm train --out DIR`"
# A resume point that cannot be used: the model in the run still loads, the run cannot go on.
_STATE_FIX = f"restore train_state.safetensors from a copy, or train a new run with {_TRAIN_HINT}"


# ----------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable. Not possible on Windows; harmless to skip there."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems do not support fsync on a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def make_dirs(path) -> None:
    """Create the folder ``path`` and its parents; a failure is a :class:`WriteError`."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e) from None


def atomic_write_bytes(path, data: bytes) -> None:
    """Replace `path` with `data` atomically (see the module docstring); creates parent folders.

    Any failure (a full disk, no permission) is a :class:`WriteError` naming the path and the
    free space there; the file that was at `path` before is left as it was.
    """
    path = Path(path)
    directory = path.parent
    make_dirs(directory)
    while True:
        tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            # O_EXCL: never clobber another writer's temp file; mode 0o666 lets the umask decide
            # the final permissions, as for a file made by open().
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            )
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise WriteError(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from None
        raise
    try:
        _fsync_dir(directory)
    except OSError as e:
        raise WriteError(path, e) from None


def atomic_write_text(path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    """Replace `path` with `obj` as JSON (indent=2, sorted keys, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path, obj) -> None:
    """Append `obj` as one JSON line to `path` (created if missing), then flush and fsync.

    Appending is not atomic: a crash can cut the last line short. If the file does not end
    with a newline, one is written first so the new line stays parseable on its own.
    """
    line = json.dumps(obj, sort_keys=True)
    if "\n" in line:  # json.dumps escapes newlines in strings; this cannot happen
        raise ValueError("a JSON line must not contain a newline")
    path = Path(path)
    make_dirs(path.parent)
    try:
        with open(path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            prefix = b""
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    prefix = b"\n"
            f.write(prefix + line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(path, e) from None


def trim_metrics(path, step: int) -> int:
    """Keep only the rows of the metrics file `path` up to `step` (a resumed run's checkpoint:
    the rows after it will be written again); lines cut short by a crash go too. Rewritten
    atomically, and only when something is removed. Returns the number of lines removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_bytes().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        at = row.get("step") if isinstance(row, dict) else None
        if isinstance(at, int) and not isinstance(at, bool) and at <= step:
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
    return len(lines) - len(kept)


# ----------------------------------------------------------------------------- tensors


def _prepare_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors, no two sharing storage (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}: {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:  # a view of / alias of a tensor already taken: store its own copy
                t = t.clone()
            else:
                storages.add(ptr)
        out[name] = t
    return out


def _tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
    return _st_save_bytes(_prepare_tensors(tensors), metadata=metadata)


def save_tensors(
    path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to a safetensors file atomically.

    Tensors are detached, moved to CPU and made contiguous; tensors sharing storage (views,
    tied weights) are cloned so each is stored on its own. dtypes and shapes are kept exactly.
    """
    atomic_write_bytes(path, _tensors_to_bytes(tensors, metadata))


def _damaged(path, err: Exception) -> RunDirError:
    return RunDirError(
        f"{path} is not a readable safetensors file ({err}); it is damaged or incomplete: "
        f"restore it from a copy or train again with {_TRAIN_HINT}"
    )


def load_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """A safetensors file as {name: tensor} on `device`; missing or corrupt: RunDirError."""
    try:
        return _st_load_file(os.fspath(path), device=str(device))
    except FileNotFoundError:
        raise RunDirError(
            f"{path} is missing; train a run with {_TRAIN_HINT} to create it"
        ) from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, e) from None


# ----------------------------------------------------------------------------- optimizer state

_TUPLE = "__tuple__"
_TENSOR = "__tensor__"


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able form of `value`: tuples tagged so they come back as tuples, tensors moved
    into `tensors` under `name` and referenced by that name."""
    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise ValueError(f"two optimizer entries map to the tensor name {name!r}")
        tensors[name] = value
        return {_TENSOR: name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"cannot store {name}: dict keys must be str")
        return {k: _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}
    raise TypeError(f"cannot store optimizer entry {name} of type {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        if set(value) == {_TENSOR}:
            return _tensor(tensors, value[_TENSOR])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _tensor(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise RunDirError(
            f"train state lacks the tensor {name!r}; the train state is damaged or from another "
            f"program: {_STATE_FIX}"
        ) from None


def optimizer_state_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `torch.optim.Optimizer.state_dict()` into tensors and JSON-able metadata.

    Returns (tensors, meta). tensors: ``{"state.<param_idx>.<key>": tensor}`` for every tensor
    in the per-parameter state (e.g. AdamW's step, exp_avg, exp_avg_sq; SGD's momentum_buffer),
    plus ``param_groups.<g>.<key>`` for any tensor-valued hyperparameter. meta:
    ``{"param_groups": [...], "scalars": {idx: {key: value}}, "tensor_keys": {idx: [key, ...]}}``
    where "scalars" holds the non-tensor per-parameter entries. Tuples (AdamW's betas) are
    tagged so they come back as tuples. Tensors are referenced, not copied.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    tensor_keys: dict[str, list[str]] = {}
    for idx, entries in state_dict.get("state", {}).items():
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise TypeError(f"optimizer state keys must be parameter indices (int), got {idx!r}")
        for key, value in entries.items():
            name = f"state.{idx}.{key}"
            if isinstance(value, torch.Tensor):
                _encode(value, name, tensors)
                tensor_keys.setdefault(str(idx), []).append(key)
            else:
                scalars.setdefault(str(idx), {})[key] = _encode(value, name, tensors)
    param_groups = [
        _encode(group, f"param_groups.{g}", tensors)
        for g, group in enumerate(state_dict.get("param_groups", []))
    ]
    return tensors, {"param_groups": param_groups, "scalars": scalars, "tensor_keys": tensor_keys}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_state_to_tensors`: a dict ready for ``optimizer.load_state_dict``.

    Only the tensors that `meta` names are used, so `tensors` may hold other entries too.
    """
    try:
        state: dict[int, dict] = {}
        for idx, keys in meta.get("tensor_keys", {}).items():
            entry = state.setdefault(int(idx), {})
            for key in keys:
                entry[key] = _tensor(tensors, f"state.{idx}.{key}")
        for idx, entries in meta.get("scalars", {}).items():
            entry = state.setdefault(int(idx), {})
            for key, value in entries.items():
                entry[key] = _decode(value, tensors)
        param_groups = [_decode(g, tensors) for g in meta["param_groups"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, RunDirError):
            raise
        raise RunDirError(
            f"optimizer state in the train state is malformed ({e!r}): {_STATE_FIX}"
        ) from None
    return {"state": dict(sorted(state.items())), "param_groups": param_groups}


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Capture every global RNG a training run draws from.

    tensors: "rng.torch_cpu" (torch's CPU generator, uint8), "rng.cuda.<i>" for each CUDA
    device if CUDA is initialized, "rng.python" (the 625 words of `random`'s Mersenne Twister,
    int64) and "rng.numpy_keys" (numpy's global MT19937 key, int64). meta: the scalar parts,
    {"python": {"version", "gauss_next"}, "numpy": {"pos", "has_gauss", "cached_gaussian"},
    "cuda_devices": n}. The big integer arrays live in tensors to keep the JSON readable.
    """
    tensors: dict[str, torch.Tensor] = {"rng.torch_cpu": torch.get_rng_state()}
    n_cuda = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
        n_cuda = len(cuda_states)
        for i, s in enumerate(cuda_states):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
    meta = {
        "python": {"version": version, "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": bit_generator,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "cuda_devices": n_cuda,
    }
    return tensors, meta


def _rng_states(tensors: dict[str, torch.Tensor], meta: dict):
    """``(torch CPU state, Python state, NumPy state, CUDA devices)`` from a captured state;
    RunDirError when an entry is missing or of the wrong kind."""
    try:
        cpu = _tensor(tensors, "rng.torch_cpu")
        py = _tensor(tensors, "rng.python")
        np_keys = _tensor(tensors, "rng.numpy_keys")
        py_meta, np_meta = meta["python"], meta["numpy"]
        gauss_next = py_meta["gauss_next"]
        if gauss_next is not None and not isinstance(gauss_next, float):
            raise TypeError(f"python gauss_next is {gauss_next!r}, not a float or null")
        py_state = (
            int(py_meta["version"]),
            tuple(int(v) for v in py.tolist()),
            gauss_next,
        )
        np_state = (
            np_meta.get("bit_generator", "MT19937"),
            np_keys.numpy().astype(np.uint32),
            int(np_meta["pos"]),
            int(np_meta["has_gauss"]),
            float(np_meta["cached_gaussian"]),
        )
        n_cuda = int(meta.get("cuda_devices", 0))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RunDirError(
            f"RNG state in the train state is malformed ({e!r}): {_STATE_FIX}"
        ) from None
    if cpu.dtype != torch.uint8 or cpu.dim() != 1:
        raise RunDirError(
            f"RNG state in the train state is malformed (rng.torch_cpu has dtype {cpu.dtype} "
            f"and shape {tuple(cpu.shape)}, expected a 1-D uint8 tensor): {_STATE_FIX}"
        )
    return cpu, py_state, np_state, n_cuda


def check_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """RunDirError unless the RNG state captured by `rng_state` can be restored: each part is
    tried on a fresh generator of its kind (torch, Python, NumPy), never the global ones."""
    cpu, py_state, np_state, _ = _rng_states(tensors, meta)
    for what, restore in (
        ("torch", lambda: torch.Generator().set_state(cpu.clone())),
        ("python", lambda: random.Random().setstate(py_state)),
        ("numpy", lambda: np.random.RandomState().set_state(np_state)),
    ):
        try:
            restore()
        except (RuntimeError, ValueError, TypeError, OverflowError) as e:
            raise RunDirError(
                f"RNG state in the train state is malformed (the {what} generator refuses it: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}): {_STATE_FIX}"
            ) from None


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore the RNGs captured by `rng_state`. Other entries in `tensors` are ignored.

    CUDA states are restored for the devices present (none if CUDA is unavailable), so a run
    saved on a GPU machine resumes on a CPU one with the CPU streams intact.
    """
    check_rng_state(tensors, meta)  # all or nothing: no global generator half restored
    cpu, py_state, np_state, n_cuda = _rng_states(tensors, meta)
    torch.set_rng_state(cpu.to(dtype=torch.uint8, device="cpu"))
    random.setstate(py_state)
    np.random.set_state(np_state)
    if n_cuda and torch.cuda.is_available():
        for i in range(min(n_cuda, torch.cuda.device_count())):
            torch.cuda.set_rng_state(_tensor(tensors, f"rng.cuda.{i}").cpu(), i)


# ----------------------------------------------------------------------------- config.json


def write_config(run_dir, config: dict) -> None:
    """Write RUN/config.json atomically, adding "format_version" and "kind"; creates RUN."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    atomic_write_json(
        Path(run_dir) / CONFIG_FILE, {**config, "format_version": FORMAT_VERSION, "kind": RUN_KIND}
    )


MAX_JSON_BYTES = 256 * 2**20  # a word vocabulary of millions of tokens is far below this


def read_json(path, fix: str) -> Any:
    """The JSON in `path`; RunDirError naming the file and `fix` when it is too large, not
    UTF-8, not JSON, or nested too deeply for Python's parser."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise RunDirError(
                f"{path} is {size:,} bytes, more than any glasslstm file of its kind "
                f"({MAX_JSON_BYTES:,}); it is damaged or foreign: {fix}"
            )
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); the file is damaged: {fix}") from None
    except RecursionError:
        raise RunDirError(
            f"{path} is nested too deeply to read (it is not a file glasslstm wrote): {fix}"
        ) from None
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e.strerror or e}") from None


def _read_json(path: Path, run_dir) -> Any:
    return read_json(
        path, f"restore it from a copy or train again with `glasslstm train --out {run_dir}`"
    )


def read_config(run_dir) -> dict:
    """Read and check RUN/config.json; returns it whole (format_version and kind included).

    Raises RunDirError when RUN is missing, is not a glasslstm run directory, was written by
    a newer glasslstm, uses an older format this version cannot read, or holds invalid JSON.
    """
    run_dir = Path(run_dir)
    foreign_fix = f"pass a directory created by {_TRAIN_HINT}"
    if not run_dir.exists():
        raise RunDirError(
            f"no run directory at {run_dir}; train one with `glasslstm train --out {run_dir}`"
        )
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a glasslstm run directory; {foreign_fix}")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(
            f"{run_dir} is not a glasslstm run directory (it has no {CONFIG_FILE}); {foreign_fix}"
        )
    config = _read_json(path, run_dir)
    if not isinstance(config, dict) or config.get("kind") != RUN_KIND:
        found = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise RunDirError(
            f"{run_dir} is not a glasslstm run directory ({path} has kind {found!r}, "
            f"expected {RUN_KIND!r}); {foreign_fix}"
        )
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunDirError(
            f"{path} has no valid format_version (found {version!r}); the file is damaged: "
            f"restore it from a copy or train again with `glasslstm train --out {run_dir}`"
        )
    if version > FORMAT_VERSION:
        raise RunDirError(
            f"{run_dir} was written by a newer glasslstm (run format version {version}; this "
            f"glasslstm reads up to version {FORMAT_VERSION}); upgrade: pip install -U glasslstm"
        )
    while version < FORMAT_VERSION:
        migrate = _MIGRATIONS.get(version)
        if migrate is None:
            raise RunDirError(
                f"{run_dir} uses run format version {version}, which cannot be read by this "
                f"glasslstm (format version {FORMAT_VERSION}); train it again with "
                f"`glasslstm train --out DIR`, or read it with the glasslstm release that wrote it"
            )
        config = migrate(config)
        version = config["format_version"]
    return config


# ----------------------------------------------------------------------------- train state


def save_train_state(run_dir, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write RUN/train_state.safetensors atomically, with `meta` inside it; then a JSON mirror.

    The resume point is the one safetensors file: its tensors (the trainer puts the model's
    weights, the optimizer and the RNG states there) and `meta` (JSON, stored in the file's
    metadata) are replaced together by one rename, so no crash can pair a new half with an old
    one. RUN/train_state.json is the same `meta` for people to read; nothing loads it.
    """
    run_dir = Path(run_dir)
    payload = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    data = _tensors_to_bytes(tensors, {_STATE_KIND_KEY: _STATE_KIND, _META_KEY: payload})
    atomic_write_bytes(run_dir / TRAIN_STATE_TENSORS, data)
    atomic_write_text(run_dir / TRAIN_STATE_JSON, payload)


def read_tensor_header(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """A safetensors file's tensors as ``{name: (shape, dtype)}``, read from its header: no
    tensor is loaded (dtype as safetensors names it: F32, I64, U8, ...). RunDirError when the
    file is missing or damaged."""
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    if not path.is_file():
        raise RunDirError(f"{path} is missing; train a run with {_TRAIN_HINT} to create it")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {}
            for name in f.keys():
                part = f.get_slice(name)
                shapes[name] = (tuple(part.get_shape()), str(part.get_dtype()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, e) from None
    return shapes, metadata


def read_train_state_header(run_dir) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict]:
    """RUN/train_state.safetensors' header, no tensor loaded: ``({name: (shape, dtype)}, meta)``
    (dtype as safetensors names it: F32, I64, U8, ...). RunDirError when the file is missing,
    damaged, or not a glasslstm train state."""
    run_dir = Path(run_dir)
    path = run_dir / TRAIN_STATE_TENSORS
    if not path.is_file():
        raise RunDirError(
            f"{path} is missing, so the run in {run_dir} cannot be resumed; "
            f"train again with `glasslstm train --out {run_dir}`"
        )
    shapes, header = _read_header(path)
    return shapes, _train_state_meta(path, run_dir, header)


def _train_state_meta(path: Path, run_dir: Path, header: dict) -> dict:
    if header.get(_STATE_KIND_KEY) != _STATE_KIND or _META_KEY not in header:
        raise RunDirError(
            f"{path} is not a glasslstm train state (no {_META_KEY!r} in its metadata); "
            f"train again with `glasslstm train --out {run_dir}`"
        )
    try:
        meta = json.loads(header[_META_KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        why = e if isinstance(e, ValueError) else ValueError("its metadata is nested too deeply")
        raise _damaged(path, why) from None
    if not isinstance(meta, dict):
        raise _damaged(path, ValueError(f"its metadata is a {type(meta).__name__}, not an object"))
    return meta


def load_train_state(run_dir) -> tuple[dict[str, torch.Tensor], dict]:
    """Read RUN/train_state.safetensors: ``(tensors on CPU, meta)`` as given to `save_train_state`.

    Raises RunDirError when the file is missing, damaged, or not a glasslstm train state.
    """
    run_dir = Path(run_dir)
    path = run_dir / TRAIN_STATE_TENSORS
    if not path.is_file():
        raise RunDirError(
            f"{path} is missing, so the run in {run_dir} cannot be resumed; "
            f"train again with `glasslstm train --out {run_dir}`"
        )
    data = path.read_bytes()
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = _st_load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, e) from None
    return tensors, _train_state_meta(path, run_dir, header)

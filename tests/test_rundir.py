"""Run directories: atomic writes, safetensors round trips, optimizer/RNG state, config checks."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from glasslstm import rundir
from glasslstm.rundir import (
    FORMAT_VERSION,
    RUN_KIND,
    RunDirError,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    load_train_state,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    read_config,
    rng_state,
    save_tensors,
    save_train_state,
    set_rng_state,
    write_config,
)

# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_crash_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_at, exc):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old\n")

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(rundir.os, fail_at, boom)
    with pytest.raises(type(exc)):
        atomic_write_bytes(target, b"new content that must not appear")
    monkeypatch.undo()

    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_save_tensors_crash_keeps_loadable_old_version(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    save_tensors(target, {"w": torch.ones(3)})

    def boom(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(rundir.os, "replace", boom)
    with pytest.raises(OSError):
        save_tensors(target, {"w": torch.zeros(3)})
    monkeypatch.undo()

    assert torch.equal(load_tensors(target)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_stray_temp_file_is_never_read(tmp_path):
    """A kill can leave `.name.<token>.tmp`; readers only open the real name."""
    target = tmp_path / "model.safetensors"
    save_tensors(target, {"w": torch.ones(2)})
    (tmp_path / ".model.safetensors.deadbeef.tmp").write_bytes(b"half a file")
    assert torch.equal(load_tensors(target)["w"], torch.ones(2))


def test_atomic_write_json_format_and_parents(tmp_path):
    path = tmp_path / "best" / "x.json"  # parent folder is created
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    text = path.read_text()
    assert text == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # umask-based, not mkstemp's 0600


_KILL_CHILD = r"""
import sys, torch
from glasslstm.rundir import save_tensors
path, n = sys.argv[1], int(sys.argv[2])
i = 1
while True:
    save_tensors(path, {"x": torch.full((n,), float(i)), "i": torch.tensor(i)})
    print(i, flush=True)
    i += 1
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
@pytest.mark.slow
def test_sigkill_during_repeated_saves_leaves_old_or_new_file(tmp_path):
    target = tmp_path / "model.safetensors"
    n = 4_000_000  # 16 MB per save: each write takes a while
    save_tensors(target, {"x": torch.zeros(n), "i": torch.tensor(0)})

    src = str(Path(rundir.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(target), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    guard = threading.Timer(60, proc.kill)  # never hang the suite if the child misbehaves
    guard.start()
    try:
        completed = 0
        while completed < 2:
            line = proc.stdout.readline()
            assert line, f"child exited early: {proc.stderr.read()}"
            completed = int(line)
        # Kill the moment a temp file exists: the child is between opening it and renaming it.
        deadline = time.monotonic() + 30
        while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, (
                "child never started a write"
            )
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        guard.cancel()
    assert proc.returncode == -signal.SIGKILL
    for line in out.split():
        completed = int(line)

    loaded = load_tensors(target)
    i = int(loaded["i"])
    assert i in (completed, completed + 1)
    assert loaded["x"].shape == (n,)
    assert torch.equal(loaded["x"], torch.full((n,), float(i)))
    # Anything else left behind is a temp file, which no reader opens.
    for p in tmp_path.iterdir():
        assert p == target or (p.name.startswith(".model.safetensors.") and p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- tensors


def test_save_load_tensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.randn(5, generator=g)
    param = torch.nn.Parameter(torch.randn(3, generator=g))
    tensors = {
        "f32": torch.randn(2, 3, generator=g),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i64": torch.arange(-3, 4, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 2),
        "base": base,
        "transposed": base.t(),  # non-contiguous view of `base`
        "row": base[1],  # contiguous view sharing storage with `base`
        "tied_a": shared,  # the same tensor twice, as with tied weights
        "tied_b": shared,
        "param": param,  # requires grad
    }
    path = tmp_path / "t.safetensors"
    save_tensors(path, tensors, metadata={"note": "hi"})
    loaded = load_tensors(path)

    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t.detach()), name
        assert not loaded[name].requires_grad
    loaded["tied_a"].add_(1)  # stored separately: no longer aliased
    assert not torch.equal(loaded["tied_a"], loaded["tied_b"])
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "hi"}


def test_save_tensors_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError):
        save_tensors(tmp_path / "t.safetensors", {"x": torch.ones(1)}, metadata={"step": 3})


def test_load_tensors_missing_or_corrupt_names_the_file(tmp_path):
    missing = tmp_path / "model.safetensors"
    with pytest.raises(RunDirError, match="model.safetensors is missing"):
        load_tensors(missing)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(RunDirError, match="garbage.safetensors is not a readable safetensors file"):
        load_tensors(garbage)

    good = tmp_path / "good.safetensors"
    save_tensors(good, {"x": torch.ones(100)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(RunDirError, match="truncated.safetensors"):
        load_tensors(truncated)


def test_append_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": 2.5})
    append_jsonl(path, {"step": 2, "loss": 2.0})
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "lo')  # a line cut short by a crash
    append_jsonl(path, {"step": 4, "loss": 1.5})
    lines = path.read_text().splitlines()
    assert [json.loads(s) for s in (lines[0], lines[1], lines[3])] == [
        {"step": 1, "loss": 2.5},
        {"step": 2, "loss": 2.0},
        {"step": 4, "loss": 1.5},
    ]
    assert lines[2] == '{"step": 3, "lo'


# ----------------------------------------------------------------------------- optimizer state


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "sgd-momentum": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_round_trip_continues_bitwise(tmp_path, kind):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)) for _ in range(8)]
    make_opt = OPTIMIZERS[kind]

    ref_model = _model()
    ref_opt = make_opt(ref_model.parameters())
    _train(ref_model, ref_opt, batches)

    model = _model()
    opt = make_opt(model.parameters())
    _train(model, opt, batches[:4])
    tensors, meta = optimizer_state_to_tensors(opt.state_dict())
    save_tensors(tmp_path / "opt.safetensors", tensors)
    save_tensors(tmp_path / "model.safetensors", model.state_dict())
    atomic_write_json(tmp_path / "opt.json", meta)
    del model, opt

    resumed = _model()
    resumed.load_state_dict(load_tensors(tmp_path / "model.safetensors"))
    resumed_opt = make_opt(resumed.parameters())
    meta_back = json.loads((tmp_path / "opt.json").read_text())
    state = optimizer_state_from_tensors(load_tensors(tmp_path / "opt.safetensors"), meta_back)
    if kind.startswith("adamw"):
        assert isinstance(state["state"][0]["step"], torch.Tensor)
        assert isinstance(state["param_groups"][0]["betas"], tuple)
    else:
        assert isinstance(state["state"][0]["momentum_buffer"], torch.Tensor)
    resumed_opt.load_state_dict(state)
    _train(resumed, resumed_opt, batches[4:])

    for (name, p), q in zip(ref_model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    ref_sd, res_sd = ref_opt.state_dict(), resumed_opt.state_dict()
    assert ref_sd["param_groups"] == res_sd["param_groups"]
    for idx, entries in ref_sd["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, res_sd["state"][idx][key]), (idx, key)


def test_optimizer_encoding_handles_odd_values():
    p = torch.nn.Parameter(torch.zeros(2))
    sd = {
        "state": {
            0: {
                "step": torch.tensor(3.0),
                "count": 7,
                "history": [torch.ones(2), torch.zeros(1)],
                "flag": None,
            }
        },
        "param_groups": [
            {
                "lr": torch.tensor(0.1),
                "betas": (0.9, 0.99),
                "foreach": None,
                "inf": float("inf"),
                "params": [0],
            }
        ],
    }
    tensors, meta = optimizer_state_to_tensors(sd)
    meta = json.loads(json.dumps(meta))  # JSON-able
    tensors["unrelated.model.weight"] = p.detach()  # other entries in the same file are ignored
    back = optimizer_state_from_tensors(tensors, meta)
    assert back["state"][0]["count"] == 7 and back["state"][0]["flag"] is None
    assert torch.equal(back["state"][0]["step"], torch.tensor(3.0))
    assert [t.tolist() for t in back["state"][0]["history"]] == [[1.0, 1.0], [0.0]]
    group = back["param_groups"][0]
    assert group["betas"] == (0.9, 0.99) and isinstance(group["betas"], tuple)
    assert torch.equal(group["lr"], torch.tensor(0.1))
    assert group["inf"] == float("inf") and group["foreach"] is None and group["params"] == [0]

    with pytest.raises(TypeError):
        optimizer_state_to_tensors({"state": {}, "param_groups": [{"fn": print, "params": [0]}]})
    del tensors["state.0.step"]
    with pytest.raises(RunDirError, match="state.0.step"):
        optimizer_state_from_tensors(tensors, meta)


# ----------------------------------------------------------------------------- RNG state


def _draw():
    return (
        torch.rand(5).tolist(),
        torch.randn(3, dtype=torch.float64).tolist(),
        random.random(),
        random.gauss(0.0, 1.0),
        np.random.rand(4).tolist(),
        float(np.random.randn()),
    )


def test_rng_round_trip_through_disk(tmp_path):
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    random.gauss(0.0, 1.0)  # leaves a cached second gaussian (gauss_next)
    np.random.randn()  # leaves numpy's cached gaussian (has_gauss=1)

    tensors, meta = rng_state()
    assert meta["python"]["gauss_next"] is not None and meta["numpy"]["has_gauss"] == 1
    save_tensors(tmp_path / "rng.safetensors", tensors)
    atomic_write_json(tmp_path / "rng.json", meta)
    expected = _draw()

    torch.manual_seed(99)
    random.seed(98)
    np.random.seed(97)
    assert _draw() != expected
    set_rng_state(
        load_tensors(tmp_path / "rng.safetensors"), json.loads((tmp_path / "rng.json").read_text())
    )
    assert _draw() == expected


def test_set_rng_state_missing_entry_is_an_error():
    tensors, meta = rng_state()
    del tensors["rng.python"]
    with pytest.raises(RunDirError, match="rng.python"):
        set_rng_state(tensors, meta)


# ----------------------------------------------------------------------------- config.json


def test_write_read_config_round_trip(tmp_path):
    run = tmp_path / "run"
    config = {"model": {"hidden_size": 8, "num_layers": 1}, "train": {"lr": 0.003}}
    write_config(run, config)
    back = read_config(run)
    assert back == {**config, "format_version": FORMAT_VERSION, "kind": RUN_KIND}
    assert (run / "config.json").read_text().endswith("}\n")


def test_read_config_missing_dir(tmp_path):
    run = tmp_path / "nope"
    with pytest.raises(RunDirError) as e:
        read_config(run)
    msg = str(e.value)
    assert f"no run directory at {run}" in msg
    assert f"glasslstm train --out {run}" in msg


def test_read_config_file_instead_of_dir(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(RunDirError, match="not a glasslstm run directory"):
        read_config(f)


def test_read_config_foreign_dir_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(RunDirError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "not a glasslstm run directory" in msg
    assert "config.json" in msg and "glasslstm train --out" in msg


@pytest.mark.parametrize(
    "content", [{"model_type": "gpt2"}, {"kind": "other-run", "format_version": 1}, [1, 2]]
)
def test_read_config_foreign_config_json(tmp_path, content):
    (tmp_path / "config.json").write_text(json.dumps(content))
    with pytest.raises(RunDirError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "not a glasslstm run directory" in msg
    assert RUN_KIND in msg and "glasslstm train --out" in msg


def test_read_config_newer_version(tmp_path):
    atomic_write_json(
        tmp_path / "config.json", {"kind": RUN_KIND, "format_version": FORMAT_VERSION + 1}
    )
    with pytest.raises(RunDirError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "newer glasslstm" in msg
    assert f"version {FORMAT_VERSION + 1}" in msg and "pip install -U glasslstm" in msg


@pytest.mark.parametrize("version", [0, -3])
def test_read_config_older_version(tmp_path, version):
    atomic_write_json(tmp_path / "config.json", {"kind": RUN_KIND, "format_version": version})
    with pytest.raises(RunDirError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and f"version {version}" in msg
    assert "cannot be read" in msg and "glasslstm train --out" in msg


def test_read_config_older_version_with_migration(tmp_path, monkeypatch):
    monkeypatch.setitem(
        rundir._MIGRATIONS, 0, lambda c: {**c, "format_version": 1, "migrated": True}
    )
    atomic_write_json(tmp_path / "config.json", {"kind": RUN_KIND, "format_version": 0})
    assert read_config(tmp_path)["migrated"] is True


@pytest.mark.parametrize("version", [None, "1", True, 1.0])
def test_read_config_bad_version_field(tmp_path, version):
    cfg = {"kind": RUN_KIND} if version is None else {"kind": RUN_KIND, "format_version": version}
    atomic_write_json(tmp_path / "config.json", cfg)
    with pytest.raises(RunDirError, match="format_version"):
        read_config(tmp_path)


@pytest.mark.parametrize("raw", [b'{"kind": "glasslstm-run", ', b"\xff\xfe not utf-8"])
def test_read_config_invalid_json(tmp_path, raw):
    (tmp_path / "config.json").write_bytes(raw)
    with pytest.raises(RunDirError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and "not valid JSON" in msg
    assert "glasslstm train --out" in msg


# ----------------------------------------------------------------------------- train state


def _train_state():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, [(torch.randn(4, 3), torch.randn(4, 2))])
    opt_tensors, opt_meta = optimizer_state_to_tensors(opt.state_dict())
    rng_tensors, rng_meta = rng_state()
    meta = {"step": 1, "epoch": 0, "best_val_loss": 1.25, "optimizer": opt_meta, "rng": rng_meta}
    return {**opt_tensors, **rng_tensors}, meta, opt


def test_train_state_round_trip(tmp_path):
    tensors, meta, opt = _train_state()
    save_train_state(tmp_path, tensors, meta)
    loaded, meta_back = load_train_state(tmp_path)
    assert meta_back == json.loads(json.dumps(meta))
    assert set(loaded) == set(tensors)
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name]), name
    state = optimizer_state_from_tensors(loaded, meta_back["optimizer"])
    fresh = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    fresh.load_state_dict(state)
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    set_rng_state(loaded, meta_back["rng"])


def test_train_state_crash_mid_save_keeps_the_previous_one(tmp_path, monkeypatch):
    """One file holds the whole resume point: a crash during a save leaves the old one whole."""
    tensors, meta, _ = _train_state()
    save_train_state(tmp_path, tensors, meta)

    def crash(*args, **kwargs):
        raise OSError("killed before the rename")

    monkeypatch.setattr(rundir.os, "replace", crash)
    with pytest.raises(OSError):
        save_train_state(tmp_path, {**tensors, "extra": torch.ones(1)}, {**meta, "step": 2})
    monkeypatch.undo()
    loaded, meta_back = load_train_state(tmp_path)
    assert meta_back["step"] == 1 and "extra" not in loaded
    # The JSON mirror is for people; a damaged mirror does not affect resuming.
    (tmp_path / "train_state.json").write_text("{")
    assert load_train_state(tmp_path)[1]["step"] == 1


def test_train_state_missing_or_foreign(tmp_path):
    with pytest.raises(RunDirError, match="train_state.safetensors is missing"):
        load_train_state(tmp_path)
    save_tensors(tmp_path / "train_state.safetensors", {"x": torch.ones(1)})
    with pytest.raises(RunDirError, match="not a glasslstm train state"):
        load_train_state(tmp_path)
    (tmp_path / "train_state.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunDirError, match="not a readable safetensors file"):
        load_train_state(tmp_path)


# ------------------------------------------------------------ nothing executes code on load


def test_module_source_never_unpickles():
    source = Path(rundir.__file__).read_text()
    assert "pickle" not in source
    assert "torch.load" not in source


def test_loading_a_run_calls_no_unpickler(tmp_path, monkeypatch):
    write_config(tmp_path, {"model": {}})
    save_tensors(tmp_path / "model.safetensors", {"w": torch.ones(2)})
    tensors, meta, _ = _train_state()
    save_train_state(tmp_path, tensors, meta)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling called while loading a run directory")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(mod, name, forbidden)
    read_config(tmp_path)
    load_tensors(tmp_path / "model.safetensors")
    loaded, meta_back = load_train_state(tmp_path)
    optimizer_state_from_tensors(loaded, meta_back["optimizer"])
    set_rng_state(loaded, meta_back["rng"])

"""The long-term-memory claim, measured: LSTM vs GRU vs vanilla RNN on the same tasks.

:func:`train_memory` trains one model on one task with a budget of training sequences and
reports the held-out metric, the trivial baseline, whether the task was solved and after how
many training sequences. :func:`gradient_norms` measures the vanishing gradient itself:
||dL/dh_t|| against the distance T - t (and the LSTM's ||dL/dc_t|| along the cell path).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glasslstm.config import INITS, MEMORY_MODELS
from glasslstm.lstm import LSTM
from glasslstm.rnn import GRU, RNN
from glasslstm.tasks import Task, make_task
from glasslstm.tasks.base import TokenTask

MODELS = MEMORY_MODELS
# The metric that decides "solved" and that the tables and plots show, per task.
PRIMARY = {"adding": "mse", "copy": "loss", "subject": "accuracy"}


class SequenceModel(nn.Module):
    """A recurrent layer and a per-step linear readout; token tasks get an embedding first."""

    def __init__(
        self,
        kind: str,
        task: Task,
        hidden_size: int = 128,
        num_layers: int = 1,
        init: str = "forget1",
    ):
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
        self.kind = kind
        self.tokens = isinstance(task, TokenTask)
        in_size = task.input_size
        self.embed = nn.Embedding(task.input_size, hidden_size) if self.tokens else None
        if self.tokens:
            in_size = hidden_size
        cls = {"lstm": LSTM, "gru": GRU, "rnn": RNN}[kind]
        extra: dict[str, Any] = {}
        if kind == "lstm":  # the GRU and the RNN keep torch's init
            extra = (
                {"chrono_init": max(2, task.seq_len)} if init == "chrono" else {"forget_bias": 1.0}
            )
        self.rnn = cls(in_size, hidden_size, num_layers, batch_first=True, **extra)
        self.head = nn.Linear(hidden_size, task.output_size)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x) if self.embed is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, input_size) or token ids (B, L) -> (B, L, output_size)."""
        return self.head(self.rnn(self.inputs(x))[0])


def task_batch(task: Task, model: SequenceModel, batch_size: int, gen: torch.Generator):
    """A batch in the form the model takes: token ids for token tasks, features otherwise."""
    if isinstance(task, TokenTask):
        ids, target = task.token_batch(batch_size, gen)
        return ids, target, None
    return task.batch(batch_size, gen)


@dataclass
class MemoryRun:
    task: str
    T: int
    model: str
    budget: int  # training sequences allowed
    init: str  # the LSTM's bias init (see INITS); others ignore it
    sequences: int  # training sequences seen
    metric: dict  # held-out metrics at the end
    primary: str  # the metric that decides "solved"
    baseline: float
    solved: bool
    solved_at: int | None  # training sequences seen when first solved
    seconds: float
    curve: list = field(default_factory=list)  # [(sequences, primary metric)]


def train_memory(
    task: Task,
    kind: str,
    *,
    budget: int,
    batch_size: int = 32,
    hidden_size: int = 128,
    lr: float = 1e-3,
    clip: float = 1.0,
    seed: int = 0,
    evals: int = 40,
    eval_size: int = 512,
    stop_when_solved: bool = True,
    log=None,
    model: SequenceModel | None = None,
    init: str = "forget1",
) -> MemoryRun:
    """Train ``kind`` on ``task`` for up to ``budget`` sequences (Adam, gradient clipping).

    ``model``: train this one (in place) instead of a fresh one built from ``seed`` and
    ``init`` (the LSTM's bias init, one of :data:`INITS`).
    """
    torch.manual_seed(seed)
    if model is None:
        model = SequenceModel(kind, task, hidden_size, init=init)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train_gen = torch.Generator().manual_seed(seed)
    held_out = task_batch(task, model, eval_size, torch.Generator().manual_seed(10**6 + seed))
    primary = PRIMARY[task.name]
    every = max(batch_size, budget // max(1, evals))
    seen, next_eval, solved_at, curve = 0, every, None, []
    metric = _evaluate(task, model, held_out)
    curve.append((0, metric[primary]))
    t0 = time.perf_counter()
    with _denormals_flushed():
        while seen < budget:
            x, target, mask = task_batch(task, model, min(batch_size, budget - seen), train_gen)
            loss = task.loss(model(x), target, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            seen += x.shape[0]
            if seen >= next_eval or seen >= budget:
                next_eval += every
                metric = _evaluate(task, model, held_out)
                curve.append((seen, metric[primary]))
                if log is not None:
                    log(
                        f"{task.name} T={task.T} {kind}: {seen:,} sequences, "
                        f"{primary} {metric[primary]:.4f} (baseline {task.baseline:.4f})"
                    )
                if solved_at is None and task.solved(metric):
                    solved_at = seen
                    if stop_when_solved:
                        break
    return MemoryRun(
        task=task.name,
        T=task.T,
        model=kind,
        budget=budget,
        init=init,
        sequences=seen,
        metric=metric,
        primary=primary,
        baseline=task.baseline,
        solved=solved_at is not None,
        solved_at=solved_at,
        seconds=time.perf_counter() - t0,
        curve=curve,
    )


@contextmanager
def _denormals_flushed():
    """Denormal floats flushed to zero on this thread while training (and back after): a
    vanishing gradient passes through the denormal range, where x86 arithmetic is 10-100x
    slower, and would make the models that lose their gradient (the point of this benchmark)
    also the slowest to train. The fused LSTM does this itself; this gives the RNN and GRU the
    same. (``gradient_norms`` keeps denormals: it measures those tiny gradients.)"""
    flushed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


@torch.no_grad()
def _evaluate(task: Task, model: SequenceModel, batch) -> dict:
    x, target, mask = batch
    model.eval()
    try:
        pred = torch.cat([model(x[i : i + 128]) for i in range(0, x.shape[0], 128)])
    finally:
        model.train()
    return task.metric(pred, target, mask)


def memory_bench(
    task_name: str, Ts: list[int], models: list[str], *, budget: int, seed: int = 0, log=None, **kw
) -> list[MemoryRun]:
    """Every model at every T, same budget and seed."""
    runs = []
    for T in Ts:
        task = make_task(task_name, T)
        for kind in models:
            runs.append(train_memory(task, kind, budget=budget, seed=seed, log=log, **kw))
            if log is not None:
                r = runs[-1]
                log(
                    f"  -> {'solved' if r.solved else 'not solved'}"
                    + (f" after {r.solved_at:,} sequences" if r.solved else "")
                    + f" in {r.seconds:.0f} s"
                )
    return runs


def runs_table(runs: list[MemoryRun]) -> str:
    lines = [
        f"{'task':8} {'T':>5} {'model':5} {'metric':>16} {'baseline':>9} {'solved':>6} "
        f"{'after (sequences)':>17} {'seconds':>8}"
    ]
    for r in runs:
        lines.append(
            f"{r.task:8} {r.T:5d} {r.model:5} "
            f"{r.primary + ' ' + format(r.metric[r.primary], '.4f'):>16} "
            f"{r.baseline:9.4f} {'yes' if r.solved else 'no':>6} "
            f"{format(r.solved_at, ',') if r.solved else '-':>17} {r.seconds:8.0f}"
        )
    return "\n".join(lines)


def runs_to_json(runs: list[MemoryRun]) -> list[dict]:
    return [asdict(r) for r in runs]


def plot_memory(runs: list[MemoryRun], path: Path) -> Path:
    """The held-out metric against T, one line per model, the baseline dashed."""
    from glasslstm.viz import _figure, save_figure

    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for kind in dict.fromkeys(r.model for r in runs):
        rs = sorted((r for r in runs if r.model == kind), key=lambda r: r.T)
        ax.plot([r.T for r in rs], [r.metric[r.primary] for r in rs], "o-", label=kind)
    by_T = sorted({(r.T, r.baseline) for r in runs})
    ax.plot([t for t, _ in by_T], [b for _, b in by_T], "k--", alpha=0.6, label="baseline")
    r0 = runs[0]
    ax.set_xscale("log")
    ax.set_xlabel("T (distance of the dependency)")
    ax.set_ylabel(f"held-out {r0.primary}")
    ax.set_title(f"{r0.task}: budget {r0.budget:,} training sequences per model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(runs: list[MemoryRun], path: Path) -> Path:
    """Learning curves: the held-out metric against training sequences seen, one panel per T,
    one line per model, the baseline dashed; where a model solved the task, a dot."""
    from glasslstm.viz import _figure, save_figure

    plt = _figure()
    Ts = sorted({r.T for r in runs})
    fig, axes = plt.subplots(1, len(Ts), figsize=(5 * len(Ts), 3.8), dpi=110, squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for r in (r for r in runs if r.T == T):
            seen, values = zip(*r.curve)
            line = ax.plot(seen, values, label=r.model)[0]
            if r.solved:
                ax.plot([r.solved_at], [dict(r.curve)[r.solved_at]], "o", color=line.get_color())
        ax.axhline(
            next(r.baseline for r in runs if r.T == T),
            color="k",
            ls="--",
            alpha=0.6,
            label="baseline",
        )
        ax.set_title(f"{runs[0].task}, T = {T}")
        ax.set_xlabel("training sequences")
        if runs[0].primary != "accuracy":  # losses: the fall below the baseline, on a log scale
            ax.set_yscale("log")
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:g}k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"held-out {runs[0].primary}")
    axes[0][-1].legend()
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- the gradient


def gradient_norms(
    model: SequenceModel, task: Task, *, batch_size: int = 32, seed: int = 0
) -> dict[str, list[float]]:
    """||dL/dh_t|| (and ||dL/dc_t|| for the LSTM) for t = 1..T, L the task loss.

    The model runs step by step with the state passed along, so each h_t is a node of the
    graph; dL/dh_t is its gradient through the later steps plus that through step t's own
    output. Norms are per sequence, averaged over the batch. Index k is the distance T - t.
    """
    x, target, mask = task_batch(task, model, batch_size, torch.Generator().manual_seed(seed))
    inp = model.inputs(x)
    state, hs, cs, outs = None, [], [], []
    for x_t in inp.unbind(1):  # not inp[:, t]: its backward would be O(T^2)
        out, state = model.rnn(x_t.unsqueeze(1), state)
        for s in (out, *state) if isinstance(state, tuple) else (out, state):
            s.retain_grad()
        if isinstance(state, tuple):
            hs.append(state[0])
            cs.append(state[1])
        else:
            hs.append(state)
        outs.append(out)
    loss = task.loss(model.head(torch.cat(outs, 1)), target, mask)
    model.zero_grad(set_to_none=True)
    loss.backward()

    def grad(t):
        return torch.zeros_like(t) if t.grad is None else t.grad

    def norm(g):  # (B, ·) or (layers, B, ·) -> mean over the batch of per-sequence norms
        return float(g.transpose(0, -2).reshape(g.shape[-2], -1).norm(dim=-1).mean())

    # the state h_t (layers, B, H) and step t's output (B, 1, H) are the same values
    h_norms = [norm(grad(h) + grad(o).transpose(0, 1)) for h, o in zip(hs, outs)]
    result = {"h": h_norms[::-1]}
    if cs:
        result["c"] = [norm(grad(c)) for c in cs][::-1]
    return result


def gradient_bench(
    task_name: str = "adding",
    T: int = 100,
    *,
    budget: int = 20_000,
    hidden_size: int = 64,
    seed: int = 0,
    log=None,
) -> dict:
    """Gradient norms against distance for each model, at initialisation and after training
    on the task for ``budget`` sequences."""
    task = make_task(task_name, T)
    out: dict[str, Any] = {
        "task": task_name,
        "T": T,
        "budget": budget,
        "hidden_size": hidden_size,
        "models": {},
    }
    for kind in MODELS:
        torch.manual_seed(seed)
        model = SequenceModel(kind, task, hidden_size)
        init = gradient_norms(model, task, seed=seed)
        run = train_memory(
            task,
            kind,
            budget=budget,
            hidden_size=hidden_size,
            seed=seed,
            stop_when_solved=False,
            model=model,
        )
        trained = gradient_norms(model, task, seed=seed)
        out["models"][kind] = {"init": init, "trained": trained, "metric": run.metric}
        if log is not None:
            log(
                f"{kind}: ||dL/dh_t|| at distance {T - 1}: {init['h'][-1]:.2e} at init, "
                f"{trained['h'][-1]:.2e} after {budget:,} sequences "
                f"({run.primary} {run.metric[run.primary]:.4f})"
            )
    return out


def plot_gradients(result: dict, path: Path) -> Path:
    """log ||dL/dh_t|| against T - t per model, at init and after training; LSTM's dL/dc_t."""
    from glasslstm.viz import _figure, save_figure

    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, sharey=True)
    for ax, when in zip(axes, ("init", "trained")):
        for kind, res in result["models"].items():
            ax.semilogy(res[when]["h"], label=f"{kind}: dL/dh_t")
            if "c" in res[when]:  # from distance 1: the loss does not read the last cell state
                c = res[when]["c"]
                ax.semilogy(range(1, len(c)), c[1:], "--", label=f"{kind}: dL/dc_t (cell path)")
        title = "at initialisation" if when == "init" else f"after {result['budget']:,} sequences"
        ax.set_title(f"{result['task']}, T={result['T']}: {title}")
        ax.set_xlabel("distance T - t")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gradient norm (mean over the batch)")
    axes[1].legend()
    fig.tight_layout()
    return save_figure(fig, path)

"""train(config) -> run directory: truncated BPTT over a corpus, with exact resume.

Knows nothing about gates or kernels: it builds a :class:`~glasslstm.model.LanguageModel`,
feeds it consecutive batches of a :class:`~glasslstm.data.TokenStream` with the LSTM state
carried (detached) from one batch to the next, and keeps the run directory up to date:

* ``train_state.safetensors`` — the resume point (weights, optimizer, RNG, carried state,
  step): written at every evaluation, on Ctrl-C and at the end; one atomic file.
* ``model.safetensors`` (latest) and ``best/model.safetensors`` (lowest validation loss).
* ``metrics.jsonl`` and, at the end, ``curves.png``.

The AWD-LSTM recipe (Merity et al. 2017) is here too: NT-ASGD (``optimizer="ntasgd"``: SGD
until validation stops improving, then the weights' running mean is what is validated, tested
and saved), windows of variable length (``variable_bptt``) and the AR/TAR penalties (``ar``,
``tar``) added to the training objective only. With any optimizer, ``ema`` keeps an
exponential moving average of the weights, and that average is validated, tested and saved.

A diverged step (NaN/Inf loss or gradient) is never applied: training stops and the last
checkpoint stays as it was. Interrupted + resumed gives bitwise the same weights as
uninterrupted (same machine, same thread count).
"""

from __future__ import annotations

import copy
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from glasslstm import __version__, options, rundir, runfiles
from glasslstm.config import ModelConfig, TrainConfig  # noqa: F401  (public here too)
from glasslstm.data import (
    Corpus,
    Tokenizer,
    TokenStream,
    build_tokenizer,
    encode_corpus,
    load_corpus,
)
from glasslstm.determinism import deterministic
from glasslstm.distributed import Ranks, check_resume, session
from glasslstm.documents import DocumentBatches
from glasslstm.errors import ConfigError, DataError, RunDirError, WriteError
from glasslstm.interrupt import GracefulStop
from glasslstm.model import LanguageModel, load_vocab
from glasslstm.progress import make_progress

LN2 = math.log(2.0)


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    stopped: str  # max_steps | time_budget | early_stopping | interrupted | diverged
    best_val_loss: float  # nats per token
    best_val_bpc: float
    last_val_loss: float
    last_val_bpc: float
    tokens_per_s: float
    seconds: float
    message: str = ""
    fill_in: list = field(default_factory=list)
    interrupted_by: str = ""  # the signal that stopped the run (SIGINT, SIGTERM, SIGHUP)
    test: dict | None = None  # the best model on the test split: loss, bpc, perplexity, tokens
    files: dict = field(default_factory=dict)  # split -> the file it was read from
    averaging_from: int | None = None  # the step after which weights were averaged (ema: 0)

    def to_json(self) -> dict:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


# ----------------------------------------------------------------------------- evaluation


def chars_per_token(tokenizer, data: bytes, n_tokens: int) -> float:
    """Characters of ``data`` per token: the factor from nats/token to bits/character."""
    if tokenizer.level == "char" or n_tokens == 0:
        return 1.0
    return len(data.decode("utf-8", errors="replace")) / n_tokens


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    ids,
    *,
    batch_size: int = 32,
    seq_len: int = 128,
    max_batches: int = 0,
    chars_per_token: float = 1.0,
    ranks: Ranks | None = None,
) -> dict:
    """Mean next-token loss over the stream ``ids`` with the state carried along each row.

    Every token but the first of each row is predicted once. Short texts get fewer rows.
    ``ranks``: in distributed training, each process evaluates its share of the rows and the
    sums are added (every process gets the same result).
    Returns ``{"loss" (nats/token), "perplexity", "bpc", "tokens"}``.
    """
    options.check(
        {"batch_size": batch_size, "seq_len": seq_len, "max_batches": max_batches},
        options.EVALUATION,
        name=str,
    )
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    n = ids.numel()
    if n < 2:
        raise ConfigError(f"need at least 2 tokens to evaluate; got {n}")
    rows = max(1, min(batch_size, n // (seq_len + 1)))
    cols = n // rows
    ranks = ranks or Ranks()
    grid = ranks.eval_rows(ids[: rows * cols].view(rows, cols)).to(model.device)
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    try:
        for k, start in enumerate(range(0, cols - 1, seq_len)):
            if (max_batches and k >= max_batches) or not len(grid):
                break
            x = grid[:, start : min(start + seq_len, cols - 1)]
            y = grid[:, start + 1 : start + 1 + x.shape[1]]
            logits, _, state = model(x, state)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum"
                )
            )
            count += y.numel()
    finally:
        model.train(was_training)
    total, count = ranks.sum(total, count)
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpc": loss / LN2 / chars_per_token,
        "tokens": count,
    }


# ----------------------------------------------------------------------------- the loop


def lr_at(cfg: TrainConfig, step: int, seconds: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warm-up, then cosine or constant.

    The cosine runs to ``max_steps``, or to the end of ``time_budget`` (by ``seconds`` of
    training so far) if that comes first — so a time-limited run still anneals. (Then the
    schedule depends on the machine's speed, and a resumed run is no longer bitwise equal.)
    """
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = 0.0  # max_steps 0: no step limit, the time budget alone
    if cfg.max_steps:
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    if cfg.time_budget:
        progress = max(progress, min(1.0, seconds / cfg.time_budget))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def bptt_length(seed: int, step: int, bptt: int) -> int:
    """The window length of optimizer step ``step`` under ``variable_bptt`` (Merity et al.
    2017): ``bptt`` with probability 0.95, else ``bptt / 2``, plus a normal draw of standard
    deviation 5, truncated to an int and kept in ``[5, 2 bptt]``. A function of (seed, step)
    alone, so a resumed run draws the same lengths."""
    rng = np.random.default_rng([seed, step])
    base = bptt if rng.random() < 0.95 else bptt / 2
    return min(max(options.MIN_BPTT, int(rng.normal(base, 5.0))), 2 * bptt)


def nonmonotone_trigger(val_losses: Sequence[float], loss: float, n: int) -> bool:
    """NT-ASGD's switch (Merity et al. 2017, Algorithm 1): whether a validation ``loss`` that
    follows ``val_losses`` is worse than the best of them all but the last ``n``, i.e. the
    run has not improved on its earlier best for ``n`` validations."""
    return len(val_losses) > n and loss > min(val_losses[:-n])


class ParameterAverage:
    """The running mean of parameters over the optimizer steps since it was made: NT-ASGD's
    averaged weights (torch's ASGD with ``t0=0, lambd=0`` keeps the same mean). Until the first
    :meth:`update` it holds the parameters as they were."""

    def __init__(self, params: Sequence[torch.Tensor], count: int = 0) -> None:
        self.params = list(params)
        self.mean = [p.detach().clone() for p in self.params]
        self.count = count

    @torch.no_grad()
    def update(self) -> None:
        """Take the parameters as they are now into the mean."""
        self.count += 1
        for m, p in zip(self.mean, self.params):
            m.add_(p.detach().sub(m).mul_(1.0 / self.count))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters replaced by their mean inside the block, restored after it."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for p, m in zip(self.params, self.mean):
                p.copy_(m)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)


class ExponentialAverage(ParameterAverage):
    """An exponential moving average of the parameters (Polyak averaging with a window): each
    :meth:`update` keeps ``decay`` of the average and takes ``1 - decay`` of the parameters.
    Early on the average keeps less, ``(1 + n) / (10 + n)`` after ``n`` updates when that is
    smaller (as TensorFlow's ExponentialMovingAverage with num_updates), so the random initial
    weights are forgotten within the first few dozen steps."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float, count: int = 0) -> None:
        super().__init__(params, count)
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        keep = min(self.decay, (1 + self.count) / (10 + self.count))
        for m, p in zip(self.mean, self.params):
            m.lerp_(p.detach(), 1.0 - keep)


def _make_optimizer(cfg: TrainConfig, model: LanguageModel) -> torch.optim.Optimizer:
    if cfg.optimizer == "ntasgd":  # AWD-LSTM's SGD: no momentum, L2 weight decay
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def default_run_dir(cfg: TrainConfig) -> Path:
    # split files: their folder's name (wikitext-2/train.txt -> wikitext-2)
    name = Path(cfg.train).resolve().parent.name if cfg.train else None
    name = name or (Path(cfg.data).stem if cfg.data else "stories")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise rundir.RunDirError(
            f"{run_dir} already exists and is not empty; continue it with "
            f"`glasslstm train --resume {run_dir}`, or choose another --out"
        )


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    overrides: dict | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    corpus: Corpus | None = None,
    build_model: Callable[[ModelConfig, Tokenizer], LanguageModel] = LanguageModel,
) -> TrainResult:
    """Train a language model; returns where it went and how it ended.

    ``resume``: a run directory to continue (its config.json is the config; ``overrides``
    may change the keys in ``TrainConfig.RESUMABLE``). ``on_step(step, loss)`` is called after
    every optimizer step. ``corpus`` skips loading (for tests and notebooks). ``build_model``
    makes the model from (ModelConfig, tokenizer); benchmarks use it to put a peer LSTM inside.
    """
    overrides = options.resolve_paths(overrides or {})  # data, data_dir, out: absolute
    if resume is not None:
        run_dir = Path(resume)
        cfg = runfiles.read_run_config(run_dir).train
        for key, value in (overrides or {}).items():
            if key not in TrainConfig.RESUMABLE and value != getattr(cfg, key):
                raise ConfigError(
                    f"--{key.replace('_', '-')} cannot change when resuming (the run has "
                    f"{getattr(cfg, key)!r}); resumable: {', '.join(TrainConfig.RESUMABLE)}"
                )
        cfg = replace(
            cfg, **{k: v for k, v in (overrides or {}).items() if k in TrainConfig.RESUMABLE}
        )
    else:  # the level's defaults for what neither config nor overrides set
        cfg = replace(config, **overrides) if config else TrainConfig(**overrides)
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        _check_new_run_dir(run_dir)
        cfg = replace(cfg, **options.resolve_paths({**asdict(cfg), "out": str(run_dir)}))

    # One process, or this one's place among those torchrun started (glasslstm.distributed).
    with session(cfg.device, cfg.batch_size) as ranks:
        device = ranks.device
        options.check_training_memory(cfg, None, device)  # before anything is loaded or built
        if resume is not None:
            check_resume(run_dir, ranks.world)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        with deterministic(cfg.deterministic):
            try:
                return _train(
                    cfg, run_dir, resume, device, progress and ranks.is_main, on_step, corpus,
                    build_model, ranks,
                )  # fmt: skip
            except WriteError as e:  # name what was kept and how to go on
                raise e.with_hint(runfiles.after_write_error(run_dir, e)) from None


@dataclass
class _Progress:
    """How far a run has come: stored in the resume point beside its tensors."""

    step: int = 0  # optimizer steps applied
    best_val_loss: float | None = None  # None until the first evaluation (JSON has no infinity)
    evals_since_best: int = 0
    seconds: float = 0.0  # of training steps (evaluation and saving not counted)
    tokens: int = 0


class _Run:
    """One training run in progress: its data, model, optimizer, carried LSTM state and run
    directory. :func:`_train` drives it: :meth:`batch`, :meth:`step`, :meth:`validate`,
    :meth:`save`."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        resume,
        device: torch.device,
        corpus: Corpus | None,
        build_model,
        ranks: Ranks,
    ) -> None:
        self.cfg, self.run_dir, self.device, self.ranks = cfg, run_dir, device, ranks
        splits = {"train": cfg.train, "valid": cfg.valid, "test": cfg.test}
        if corpus is None and resume is not None:
            flags = "--train NEW_PATH ..." if cfg.train else "--data NEW_PATH"
            moved = f"resume with `glasslstm train --resume {run_dir} {flags}`"
            corpus = runfiles.load_run_corpus(
                run_dir, cfg.data, cfg.data_dir, moved_fix=moved, splits=splits
            )
        corpus = corpus or load_corpus(cfg.data, data_dir=cfg.data_dir, seed=0, **splits)
        tok = (
            load_vocab(run_dir)
            if resume is not None
            else build_tokenizer(cfg.level, corpus, min_freq=cfg.min_freq)
        )
        train_ids, self.val_ids = encode_corpus(tok, corpus)
        if len(self.val_ids) < 2:  # found now, not after the first eval_every steps
            raise DataError(
                f"the validation split of {corpus.name!r} has {len(self.val_ids)} token(s); "
                "validation needs at least 2: train on a longer text"
            )
        if resume is not None:  # the same text, wherever it is now
            runfiles.check_resumed_corpus(run_dir, cfg, corpus, len(train_ids), len(self.val_ids))
        options.check_training_memory(cfg, tok.vocab_size, device)
        self.stream = ranks.stream(  # this process's rows of each (global) batch
            TokenStream(train_ids, cfg.batch_size, cfg.seq_len, what="the training split")
        )
        self.documents = (
            DocumentBatches(
                train_ids,
                tok,
                cfg.batch_size,
                cfg.seq_len,
                seed=cfg.seed,
                curriculum=cfg.curriculum,
                answers=cfg.answers,
                answer_weight=cfg.answer_weight,
            )
            if cfg.batching == "documents"
            else None
        )
        self.val_cpt = chars_per_token(tok, corpus.val, len(self.val_ids))
        self.train_cpt = chars_per_token(tok, corpus.train, len(train_ids))
        self.files = dict(corpus.files)
        self.test_ids = None
        if corpus.test:
            what = f"the test file {corpus.files.get('test', corpus.name)!r}"
            self.test_ids = tok.encode_bytes(corpus.test, what=what)
            self.test_cpt = chars_per_token(tok, corpus.test, len(self.test_ids))
            self.test_unknown = tok.unknown(corpus.test.decode("utf-8", errors="replace"))

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model_config(tok.vocab_size), tok).to(device)
        ranks.seed(cfg.seed)
        self.opt = _make_optimizer(cfg, self.model)
        self.progress = _Progress()
        self.state: tuple[torch.Tensor, ...] | None = None  # carried across batches
        self.pos = 0  # variable_bptt: the column of the rows where the next window starts
        self.val_losses: list[float] = []  # ntasgd: the validations before averaging started
        self.average: ParameterAverage | None = None  # ntasgd once averaging started; ema
        self.averaging_from: int | None = None
        if cfg.ema:  # averaged from the first step
            self.average, self.averaging_from = self._new_average(), 0
        if resume is not None:
            self.state, tensors, stored = _load_resume_point(
                run_dir, self.model, self.opt, self.progress, device, cfg.batch_size, ranks
            )
            self._load_recipe_state(tensors, stored)
            self.saved_step: int | None = self.progress.step  # the checkpoint on disk
            if ranks.is_main:
                rundir.trim_metrics(run_dir / "metrics.jsonl", self.progress.step)  # no dups
        elif not ranks.is_main:  # rank 0 alone writes the run directory (below)
            self.saved_step = None
            self.save()  # its share of rank 0's step-0 save (a collective step)
        else:
            rundir.make_dirs(run_dir)
            rundir.write_config(
                run_dir,
                {
                    "glasslstm_version": __version__,
                    "model": self.model.config_dict(),
                    "train": asdict(cfg),
                    "corpus": {
                        "name": corpus.name,
                        "source": corpus.source,
                        "train_tokens": int(len(train_ids)),
                        "val_tokens": int(len(self.val_ids)),
                        "sha256": runfiles.corpus_sha256(corpus),
                        **({"files": corpus.files} if corpus.files else {}),
                        **(
                            {"test_tokens": int(len(self.test_ids))}
                            if self.test_ids is not None
                            else {}
                        ),
                    },
                },
            )
            rundir.atomic_write_json(run_dir / "vocab.json", tok.to_dict())
            self.saved_step = None
            self.save()  # step 0: a run that fails at once still leaves a loadable directory
        self.forward = ranks.wrap(self.model)  # DDP around the model when there are ranks

    def save(self) -> None:
        """The resume point and the latest weights, for the current step (once per step)."""
        step = self.progress.step
        if self.saved_step != step:
            state, extra, meta = self.ranks.for_save(self.state)  # all ranks' share, on rank 0
            if self.ranks.is_main:
                if self.average is not None:
                    extra = {
                        **extra,
                        **{f"average.{i}": m for i, m in enumerate(self.average.mean)},
                    }
                meta = {**meta, "awd": self._recipe_state()}
                _save_resume_point(
                    self.run_dir, self.model, self.opt, self.progress, state, extra, meta
                )
                with self.averaged():  # the latest model: the average once there is one
                    self.model.save_weights(
                        self.run_dir / "model.safetensors", metadata={"step": str(step)}
                    )
            self.saved_step = step

    def _recipe_state(self) -> dict:
        """What the AWD-LSTM recipe needs to resume, beside the average's tensors."""
        return {
            "stream_pos": self.pos,
            "val_losses": list(self.val_losses),
            "averaging_from": self.averaging_from,
            "average_count": 0 if self.average is None else self.average.count,
        }

    def _load_recipe_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """The recipe's state from the resume point (absent in runs without it: defaults)."""
        path = self.run_dir / rundir.TRAIN_STATE_TENSORS
        awd = meta.get("awd", {})
        fix = f"train again with `glasslstm train --out NEW_DIR` (the resume point in {path})"
        if not isinstance(awd, dict):
            raise RunDirError(f"{path}: meta.awd is not the recipe's state; {fix}")
        pos, losses = awd.get("stream_pos", 0), awd.get("val_losses", [])
        start, count = awd.get("averaging_from"), awd.get("average_count", 0)
        ok = (
            isinstance(pos, int)
            and pos >= 0
            and isinstance(losses, list)
            and all(options.is_finite_number(v) for v in losses)
            and (start is None or isinstance(start, int))
            and isinstance(count, int)
            and count >= 0
        )
        if not ok:
            raise RunDirError(f"{path}: meta.awd is not the recipe's state; {fix}")
        self.pos, self.val_losses, self.averaging_from = pos, [float(v) for v in losses], start
        if start is None:
            return
        params = list(self.model.parameters())
        self.average = self._new_average(count)
        for i, (m, p) in enumerate(zip(self.average.mean, params)):
            saved = tensors.get(f"average.{i}")
            if saved is None or saved.shape != p.shape or not torch.isfinite(saved).all():
                raise RunDirError(
                    f"{path}: average.{i} is missing or not the weights' shape; {fix}"
                )
            m.copy_(saved)

    def _new_average(self, count: int = 0) -> ParameterAverage:
        """The average the recipe keeps: --ema's moving one, or NT-ASGD's running mean."""
        params = list(self.model.parameters())
        if self.cfg.ema:
            return ExponentialAverage(params, self.cfg.ema, count)
        return ParameterAverage(params, count)

    def averaged(self):
        """The model with the averaged weights (--ema, or NT-ASGD's once it started) in the
        block; as it is without an average."""
        return nullcontext() if self.average is None else self.average.applied()

    def log(self, record: dict) -> None:
        if self.ranks.is_main:
            rundir.append_jsonl(self.run_dir / "metrics.jsonl", record)

    def validate(self) -> dict:
        """Evaluate on the validation split; keep the model as best/ when it improved."""
        cfg, p = self.cfg, self.progress
        averaged = self.average is not None
        with self.averaged():  # --ema, ntasgd: the average is what is validated and kept
            res = evaluate(
                self.model,
                self.val_ids,
                batch_size=cfg.batch_size,
                seq_len=cfg.seq_len,
                max_batches=cfg.eval_batches,
                chars_per_token=self.val_cpt,
                ranks=self.ranks,
            )
            if p.best_val_loss is None or res["loss"] < p.best_val_loss:
                p.best_val_loss, p.evals_since_best = res["loss"], 0
                if self.ranks.is_main:
                    self.model.save_weights(
                        self.run_dir / "best" / "model.safetensors",
                        metadata={"step": str(p.step)},
                    )
            else:
                p.evals_since_best += 1
        if cfg.optimizer == "ntasgd" and self.average is None:
            if nonmonotone_trigger(self.val_losses, res["loss"], cfg.nonmono):
                # the steps from here on are averaged (every rank the same, as its weights)
                self.average = self._new_average()
                self.averaging_from, self.val_losses = p.step, []
            else:
                self.val_losses.append(res["loss"])
        self.log(
            {
                "split": "val",
                "step": p.step,
                "loss": res["loss"],
                "bpc": res["bpc"],
                "perplexity": res["perplexity"],
                "seconds": round(p.seconds, 3),
                **({"averaged": averaged} if cfg.optimizer == "ntasgd" or cfg.ema else {}),
            }
        )
        return res

    def score_test(self) -> dict | None:
        """The best model (``best/``) on the test split, logged as the ``test`` row of
        metrics.jsonl; None when the corpus has no test split."""
        if self.test_ids is None:
            return None
        cfg = self.cfg
        best = copy.deepcopy(self.model)  # the training model and its state stay as they are
        weights = rundir.load_tensors(self.run_dir / "best" / "model.safetensors")
        best.load_state_dict(weights, strict=not cfg.tie_weights)
        res = evaluate(
            best,
            self.test_ids,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            chars_per_token=self.test_cpt,
        )
        res["unknown"] = self.test_unknown
        self.log({"split": "test", "step": self.progress.step, **res})
        return res

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The next training batch ``(x, y, weights)`` on the device (weights: None, or the
        loss weight of each target); resets the carried state where rows restart (a new pass
        over the stream, independent random windows, windows of whole documents)."""
        cfg, step = self.cfg, self.progress.step
        if self.documents is not None:
            self.state = None  # every row starts at a document's beginning
            # every rank draws the same global batch and trains its own rows of it
            x, y, w = (
                None if t is None else self.ranks.rows(t) for t in self.documents.batch(step)
            )
            assert x is not None and y is not None
            return x.to(self.device), y.to(self.device), None if w is None else w.to(self.device)
        if cfg.batching == "random":
            self.state = None  # independent windows: nothing to carry
            x, y = self.stream.random_batch(cfg.seed * 1_000_003 + step)
        elif cfg.variable_bptt:
            if self.pos + 1 >= self.stream.columns:
                self.pos = 0
            if self.pos == 0:
                self.state = None  # a new pass over the stream: rows restart at their beginning
            x, y = self.stream.window(self.pos, bptt_length(cfg.seed, step, cfg.seq_len))
            self.pos += x.shape[1]
        else:
            k = step % self.stream.num_batches
            if k == 0:
                self.state = None  # a new pass over the stream: rows restart at their beginning
            x, y = self.stream.batch(k)
        return x.to(self.device), y.to(self.device), None

    def step(self, x: torch.Tensor, y: torch.Tensor, w, lr: float) -> tuple[float, bool]:
        """One optimizer step at learning rate ``lr``: ``(loss, applied)``; ``w``: None or the
        targets' loss weights. A step whose loss or gradient norm is not finite is not applied
        (the run has diverged). The loss returned is the cross-entropy; the gradient is that of
        the cross-entropy plus the AR/TAR penalties (``ar``, ``tar``)."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr
        # bf16: the LSTM's matrix products in bf16 (its state and gate math float32), the
        # output layer's too; the loss in float32 (autocast's rule for cross-entropy).
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"
        ):
            _, loss, new_state, *penalty = self.forward(
                x, self.state, y, weights=w, ar=cfg.ar, tar=cfg.tar
            )
        loss_value = self.ranks.mean(loss.detach())  # the global batch's mean loss
        objective = loss + penalty[0] if penalty else loss
        self.opt.zero_grad(set_to_none=True)
        if not math.isfinite(loss_value) or not math.isfinite(float(objective.detach())):
            return loss_value, False
        objective.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip or math.inf)
        if not math.isfinite(float(norm)):
            return loss_value, False
        self.opt.step()
        if self.average is not None:
            self.average.update()
        self.state = tuple(s.detach() for s in new_state)
        return loss_value, True


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    resume,
    device: torch.device,
    progress: bool,
    on_step,
    corpus: Corpus | None,
    build_model,
    ranks: Ranks,
) -> TrainResult:
    """:func:`train` once its configuration, run directory and device are settled."""
    run = _Run(cfg, run_dir, resume, device, corpus, build_model, ranks)
    p = run.progress
    bar = (
        make_progress(
            max_steps=cfg.max_steps, time_budget=cfg.time_budget, step=p.step, seconds=p.seconds
        )
        if progress
        else None
    )
    stopped, message, last_val, stop_name = "max_steps", "", None, ""
    window = _Window()
    run.model.train()
    with GracefulStop() as interrupt, bar or nullcontext():
        while not cfg.max_steps or p.step < cfg.max_steps:
            t_step = time.perf_counter()
            x, y, w = run.batch()
            lr = lr_at(cfg, p.step, p.seconds)
            if cfg.variable_bptt:  # a shorter window, a smaller step (Merity et al. 2017)
                lr *= x.shape[1] / cfg.seq_len
            loss, applied = run.step(x, y, w, lr)
            if not applied:
                stopped = "diverged"
                message = (
                    f"training diverged at step {p.step + 1} (loss {loss}, gradient "
                    "norm not finite); the step was not applied and the last good "
                    f"checkpoint (step {run.saved_step}) is kept in {run_dir}. "
                    "Lower --lr or keep --clip on, then resume or train again."
                )
                break
            p.step += 1
            p.tokens += x.numel() * ranks.world
            p.seconds += ranks.slowest(time.perf_counter() - t_step)  # the same on every rank
            window.add(loss, x.numel() * ranks.world)
            if on_step is not None:
                on_step(p.step, loss)
            if p.step % cfg.log_every == 0 or p.step == cfg.max_steps:
                mean, tps = window.take()
                bpc = mean / LN2 / run.train_cpt
                run.log(
                    {
                        "split": "train",
                        "step": p.step,
                        "loss": mean,
                        "bpc": bpc,
                        "lr": lr,
                        "tokens_per_s": tps,
                        "seconds": round(p.seconds, 3),
                    }
                )
                if bar is not None:
                    averaging = (
                        {}
                        if run.averaging_from is None or cfg.ema
                        else {"avg_from": str(run.averaging_from)}
                    )
                    bar.show(loss=f"{mean:.3f}", bpc=f"{bpc:.3f}", tok_s=f"{tps:,.0f}", **averaging)
            if bar is not None:
                bar.advance(p.step, p.seconds)
            out_of_time = cfg.time_budget and p.seconds >= cfg.time_budget
            if p.step % cfg.eval_every == 0 or p.step == cfg.max_steps or out_of_time:
                last_val = run.validate()
                run.save()
                if cfg.patience and p.evals_since_best >= cfg.patience:
                    stopped = "early_stopping"
                    break
            if out_of_time:
                stopped = "time_budget"
                break
            stop = ranks.stop_signal(interrupt.signum)  # any rank's: all stop after this step
            if stop:
                stopped, stop_name = "interrupted", signal.Signals(stop).name
                run.save()
                message = (
                    f"interrupted at step {p.step} ({stop_name}); saved. Continue with "
                    f"`glasslstm train --resume {run_dir}`"
                )
                break
    if bar is not None:
        bar.close()
    finished = stopped not in ("interrupted", "diverged")
    if last_val is None and finished:
        last_val = run.validate()
    # the test split is scored once, by the process that writes (no other rank reads best/
    # while it may still be being replaced)
    test = run.score_test() if finished and ranks.is_main else None
    if ranks.is_main:
        _write_curves(run_dir)
    if not message:
        message = f"stopped: {stopped} at step {p.step}"
    if cfg.ema:
        message += (
            f"; validation, test and the saved models use the weights' moving average (--ema "
            f"{cfg.ema})"
        )
    elif run.averaging_from is not None:
        message += (
            f"; NT-ASGD averaged the weights from step {run.averaging_from} (validation, test "
            "and the saved models use the average)"
        )
    best = math.nan if p.best_val_loss is None else p.best_val_loss
    return TrainResult(
        run_dir=run_dir,
        step=p.step,
        stopped=stopped,
        best_val_loss=best,
        best_val_bpc=best / LN2 / run.val_cpt,
        last_val_loss=last_val["loss"] if last_val else math.nan,
        last_val_bpc=last_val["bpc"] if last_val else math.nan,
        tokens_per_s=p.tokens / max(p.seconds, 1e-9),
        seconds=p.seconds,
        message=message,
        interrupted_by=stop_name,
        test=test,
        files=run.files,
        averaging_from=run.averaging_from,
    )


class _Window:
    """Mean training loss and tokens/s since the last ``take()`` (the train-loss log lines)."""

    def __init__(self) -> None:
        self.loss, self.n, self.tokens, self.t0 = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.n, self.tokens = self.loss + loss, self.n + 1, self.tokens + tokens

    def take(self) -> tuple[float, float]:
        now = time.perf_counter()
        mean, tps = self.loss / max(self.n, 1), self.tokens / max(now - self.t0, 1e-9)
        self.loss, self.n, self.tokens, self.t0 = 0.0, 0, 0, now
        return mean, tps


def _save_resume_point(
    run_dir: Path, model, opt, progress: _Progress, state, extra: dict, extra_meta: dict
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(extra)  # distributed runs: each rank's random generators
    opt_tensors, opt_meta = rundir.optimizer_state_to_tensors(opt.state_dict())
    rng_tensors, rng_meta = rundir.rng_state()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    if state is not None:  # (h, c) of an LSTM, (h,) of a vanilla RNN
        tensors.update({f"carry.{k}": v for k, v in zip("hc", state)})
    meta = {**asdict(progress), "optimizer": opt_meta, "rng": rng_meta, **extra_meta}
    rundir.save_train_state(run_dir, tensors, meta)


def _load_resume_point(
    run_dir: Path, model, opt, progress: _Progress, device, batch_size: int, ranks: Ranks
):
    """Load the resume point into ``model``, ``opt`` and ``progress``; returns ``(carried
    state or None, the file's tensors, its meta)``."""
    tensors, stored = runfiles.read_train_state(run_dir, model, opt, progress, batch_size)
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    opt.load_state_dict(rundir.optimizer_state_from_tensors(tensors, stored["optimizer"]))
    rundir.set_rng_state(tensors, stored["rng"])
    for key in asdict(progress):
        setattr(progress, key, stored[key])
    carried = tuple(tensors[f"carry.{k}"] for k in "hc" if f"carry.{k}" in tensors) or None
    state = ranks.restore(tensors, carried)  # this rank's generators and rows
    return None if state is None else tuple(s.to(device) for s in state), tensors, stored


def _write_curves(run_dir: Path) -> None:
    from glasslstm.viz import plot_curves

    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")

"""Data-parallel training on several processes: torchrun's environment, DDP, one writer.

``torchrun --nproc-per-node N -m glasslstm train ...`` (or ``glasslstm train --nproc N``,
which starts torchrun's agent, :func:`launch`) runs N copies of the trainer. Each finds its
place in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, the
rendezvous address), and :func:`session` joins them into one process group: gloo on the CPU,
NCCL on GPUs (process ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``). Without that environment the
trainer runs as one process and every method of :class:`Ranks` does nothing.

What the N processes share and what each has:

* ``--batch-size`` is the global batch: its rows are split evenly, rank ``r`` taking the
  contiguous block ``[r B/N, (r+1) B/N)`` of every batch. In stream batching the rows are
  contiguous stretches of the token stream, so each rank reads its own disjoint shard of the
  text and carries its own LSTM state along it; the union of the ranks' batches is exactly
  the one-process batch, and so is the mean loss and (through DDP's gradient averaging) the
  gradient: N processes train the same model as one (to float rounding, with no dropout).
* The weights and the optimizer are replicas (DDP starts them from rank 0's and keeps them
  equal). Dropout draws from a separate random stream on each rank.
* Rank 0 alone writes the run directory: the resume point (the ranks' carried states and
  random generators gathered into it), the weights, metrics.jsonl, the progress bar. Every rank
  reads the same resume point on ``--resume``, which needs the world size it was written with.
* Validation rows are split among the ranks and their sums added, so every rank has the same
  loss and takes the same best/early-stopping decision. Per step, the ranks also agree on the
  step's time (the slowest rank's, for ``--time-budget`` and the schedule) and on a stop signal
  (one rank's SIGINT/SIGTERM stops all of them after the same step, saved once).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from glasslstm import options, rundir
from glasslstm.errors import ConfigError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# In the resume point: the world size it was written with (absent: one process), and each
# rank's random generators, one row per rank (rank 0's are also the ordinary "rng." entries).
WORLD_KEY = "world_size"
RNG_CPU_KEY = "ranks.rng_torch_cpu"
RNG_CUDA_KEY = "ranks.rng_cuda"
_RANK_SEED = 1_000_003  # rank r > 0 reseeds with seed + r * this, after the model is built
_left_group = False  # set once session() has left a process group it joined: see finish()


def world_size() -> int:
    """The number of training processes torchrun started (1 outside torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(value))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={value!r} is not a number; launch with torchrun") from None


def rank() -> int:
    """This process's rank (0 outside torchrun): rank 0 prints and writes."""
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


class Ranks:
    """This process's place among the training processes, and the few collective steps the
    trainer takes. One process (``world == 1``): every method is the identity."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = torch.device("cpu")  # where collectives run (the rank's GPU with NCCL)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory and prints."""
        return self.rank == 0

    # ------------------------------------------------------------------ data
    def rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous block of the global batch's rows along ``dim``."""
        if self.world == 1:
            return t
        b = t.shape[dim] // self.world
        return t.narrow(dim, self.rank * b, b).contiguous()

    def stream(self, stream):
        """This rank's share of a :class:`~glasslstm.data.TokenStream`'s batches."""
        return stream if self.world == 1 else RowShard(stream, self)

    def eval_rows(self, grid: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a validation grid (every world-th: any row count works)."""
        return grid if self.world == 1 else grid[self.rank :: self.world]

    # ------------------------------------------------------------------ the model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that trains: ``model`` itself, or DDP around it (gradients averaged
        over the ranks during backward; the weights start from rank 0's)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)  # (the model has no buffers)

    def seed(self, seed: int) -> None:
        """Give ranks other than 0 their own random stream (dropout), once the model is
        built from the common seed. Rank 0 keeps the stream a one-process run has."""
        if self.rank > 0:
            torch.manual_seed(seed + self.rank * _RANK_SEED)

    # ------------------------------------------------------------------ agreement
    def mean(self, value: torch.Tensor) -> float:
        """The mean over the ranks of a scalar (each rank's mean loss: equal row counts, so
        this is the global batch's mean loss)."""
        if self.world == 1:
            return value.item()
        t = value.detach().to(self.device, torch.float64).reshape(1)
        dist.all_reduce(t)
        return t.item() / self.world

    def slowest(self, seconds: float) -> float:
        """A step's time as every rank counts it: the slowest rank's (``--time-budget`` and the
        learning-rate schedule read it, so it must be the same everywhere)."""
        if self.world == 1:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def stop_signal(self, signum: int) -> int:
        """The stop signal any rank has received (0: none), the same on every rank, so that
        all stop after the same step."""
        if self.world == 1:
            return signum
        t = torch.tensor([signum], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sum(self, total: float, count: int) -> tuple[float, int]:
        """Validation: the loss sum and token count over all ranks' rows."""
        if self.world == 1:
            return total, count
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        dist.broadcast(t, 0)  # rank 0's figures, bit for bit, on every rank
        return t[0].item(), int(t[1].item())

    # ------------------------------------------------------------------ the resume point
    def for_save(self, state) -> tuple[object, dict[str, torch.Tensor], dict]:
        """Gather, for rank 0 to write: the global carried state (rows of all ranks, shape as
        one process has it), each rank's random generators, and the world size."""
        if self.world == 1:
            return state, {}, {}
        if state is not None:
            state = tuple(torch.cat(self._gather(s), dim=1) for s in state)
        tensors = {RNG_CPU_KEY: torch.stack(self._gather(torch.get_rng_state()))}
        if self.device.type == "cuda":
            own = torch.cuda.get_rng_state(self.device)
            tensors[RNG_CUDA_KEY] = torch.stack(self._gather(own))
        return state, tensors, {WORLD_KEY: self.world}

    def restore(self, tensors: dict[str, torch.Tensor], state):
        """After the resume point is loaded (rank 0's generators everywhere): this rank's
        generators and its rows of the carried state."""
        if self.world == 1:
            return state
        torch.set_rng_state(tensors[RNG_CPU_KEY][self.rank].clone())
        if self.device.type == "cuda" and RNG_CUDA_KEY in tensors:
            torch.cuda.set_rng_state(tensors[RNG_CUDA_KEY][self.rank].clone(), self.device)
        return None if state is None else tuple(self.rows(s, dim=1) for s in state)

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.to(self.device).contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return [p.cpu() for p in parts]


class RowShard:
    """A rank's rows of a :class:`~glasslstm.data.TokenStream`: batch ``k`` (or a random
    batch) is the global one's rows ``[r B/N, (r+1) B/N)``, a contiguous shard of the stream."""

    def __init__(self, stream, ranks: Ranks) -> None:
        self.stream, self.ranks = stream, ranks

    @property
    def num_batches(self) -> int:
        return self.stream.num_batches

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.stream.batch(k)
        return self.ranks.rows(x), self.ranks.rows(y)

    def random_batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.stream.random_batch(seed)
        return self.ranks.rows(x), self.ranks.rows(y)

    @property
    def columns(self) -> int:
        return self.stream.columns

    def window(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.stream.window(start, length)
        return self.ranks.rows(x), self.ranks.rows(y)


# ----------------------------------------------------------------------------- checks


def check_batch(batch_size: int, world: int) -> None:
    """The global batch must split evenly among the processes."""
    if world > 1 and batch_size % world:
        raise ConfigError(
            f"--batch-size {batch_size} is the global batch and must split evenly among the "
            f"{world} processes: use a multiple of {world}"
        )


def trained_world_size(run_dir) -> int:
    """The number of processes the resume point in ``run_dir`` was written by."""
    _, meta = rundir.read_train_state_header(run_dir)
    value = meta.get(WORLD_KEY, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        path = Path(run_dir) / rundir.TRAIN_STATE_TENSORS
        raise ConfigError(f"{path}: meta.{WORLD_KEY} is {value!r}; expected a positive integer")
    return value


def check_resume(run_dir, world: int) -> None:
    """A run resumes with the number of processes it was trained with: each rank's carried
    state and random stream are that rank's."""
    trained = trained_world_size(run_dir)
    if trained != world:
        how = (
            f"`glasslstm train --resume {run_dir}`"
            if trained == 1
            else f"`glasslstm train --resume {run_dir} --nproc {trained}` (or torchrun "
            f"--nproc-per-node/--nnodes making {trained} processes)"
        )
        raise ConfigError(
            f"{run_dir} was trained with {_processes(trained)} and cannot resume with "
            f"{_processes(world)} (each process carries its own rows' state): resume with {how}"
        )


def _processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


# ----------------------------------------------------------------------------- the group


@contextmanager
def session(device_name: str, batch_size: int) -> Iterator[Ranks]:
    """This process's :class:`Ranks`, with the process group joined for the duration when
    torchrun started several (left as it is if the caller already joined one)."""
    global _left_group
    world = world_size()
    if world == 1:
        ranks = Ranks()
        ranks.device = options.resolve_device(device_name)
        yield ranks
        return
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with "
            "torchrun (or `glasslstm train --nproc N`)"
        )
    check_batch(batch_size, world)
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    ranks.device = _rank_device(device_name, ranks.local_rank)
    joined = not dist.is_initialized()
    if joined:
        if ranks.device.type == "cuda":
            torch.cuda.set_device(ranks.device)
        dist.init_process_group("nccl" if ranks.device.type == "cuda" else "gloo")
    elif dist.get_world_size() != world:
        raise ConfigError(
            f"the process group has {dist.get_world_size()} processes but WORLD_SIZE={world}"
        )
    try:
        yield ranks
    finally:
        if joined:
            dist.destroy_process_group()
            _left_group = True


def finish(status: int) -> NoReturn:
    """End the process with ``status``: the ``glasslstm`` program's last call.

    A process that trained as one of several (it joined a process group in :func:`session`)
    runs its exit handlers, flushes its output and ends without the interpreter's teardown.
    The group's gloo worker threads outlive :func:`dist.destroy_process_group` (DDP keeps the
    group alive), and a worker thread that lets go of the last collective's tensors while the
    interpreter is being torn down cannot take the GIL to free them: the process aborts
    ("terminate called without an active exception"), after a run that had finished and
    saved, and the launcher reports the run as failed. Its chance grows with the machine's load.
    Any other process exits as ``sys.exit(status)`` would.
    """
    if not _left_group:
        sys.exit(status)
    atexit._run_exitfuncs()  # logging's and any library's handlers, while all is still whole
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to deliver
            pass
    os._exit(status)


def _rank_device(name: str, local_rank: int) -> torch.device:
    dev = options.resolve_device(name)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(
            f"--device {name}: distributed training runs on the CPU (gloo) or CUDA GPUs "
            "(NCCL); use --device cpu or cuda"
        )
    if name not in ("auto", "cuda"):
        raise ConfigError(
            f"--device {name} names one GPU, but each training process takes its own "
            "(cuda:LOCAL_RANK): use --device cuda (or auto)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"process LOCAL_RANK={local_rank} has no GPU of its own (this machine has {count}): "
            f"start at most {count} processes per machine (--nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


# ----------------------------------------------------------------------------- launching


def launch(nproc: int, train_args: list[str], *, shutdown_timeout: int = 120) -> int:
    """Run ``glasslstm train TRAIN_ARGS`` as ``nproc`` processes on this machine through
    torchrun's agent (a local rendezvous on a free port); returns the exit status.

    A stop signal to this process reaches every training process once (the agent passes it
    on); they stop after the same step, rank 0 saves, and the status is ``128 + signal``.
    ``shutdown_timeout``: seconds the agent waits for that save before killing them.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if world_size() > 1:
        raise ConfigError(
            "--nproc starts the training processes itself; under torchrun leave it out"
        )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    # The processes print their own errors (one line each); the agent's log lines about them
    # would only repeat that they failed.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--shutdown-timeout={shutdown_timeout}",
            "-m",
            "glasslstm",
            "train",
            *train_args,
        ]
    )
    try:
        run(args)
    except ChildFailedError as e:  # the failing process printed its error already
        codes = [f.exitcode for f in e.failures.values() if f.exitcode]
        return next((c for c in codes if c > 0), 1)
    except SignalException as e:
        print(f"glasslstm train: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0

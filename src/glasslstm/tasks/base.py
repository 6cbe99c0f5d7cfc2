"""The interface every long-term-memory task shares, and its argument checks.

A task generates batches from a ``torch.Generator`` (same generator state -> same batch), and
owns its scoring: which steps count, the loss to train on, the held-out metric, its trivial
baseline and when it counts as solved. Models see ``x`` batch first, ``(B, L, input_size)``
float32, and return ``pred`` of shape ``(B, L, output_size)``: one output per step, of which the
task scores the steps it defines (the last step, or all of them).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Task", "check_batch_size", "check_T"]


@runtime_checkable
class Task(Protocol):
    """A generated sequence task with its own loss, metric, baseline and success criterion."""

    name: str  # "adding" | "copy" | "subject"
    T: int  # the time lag the task is about (see each task for how L follows from it)
    seq_len: int  # L, the number of steps of x
    input_size: int  # features per step of x
    output_size: int  # outputs per step the model must produce (logits, or 1 for regression)
    kind: str  # "regression" | "classification"
    baseline: float  # the headline metric of a trivial predictor

    def batch(self, batch_size: int, generator) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x (B, L, input_size) float32, target, mask or None)``."""

    def loss(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        """Scalar training loss of ``pred (B, L, output_size)``."""

    def metric(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> dict[str, float]:
        """Held-out metrics, plain floats."""

    def solved(self, metric: dict[str, float]) -> bool:
        """Whether ``metric`` (from :meth:`metric`) meets the task's success criterion."""


@runtime_checkable
class TokenTask(Task, Protocol):
    """A task whose inputs are token ids: a model embeds them instead of reading features."""

    def token_batch(self, batch_size: int, generator) -> tuple[Tensor, Tensor]:
        """``(ids (B, L) int64, target)``."""
        ...


def check_T(name: str, T, minimum: int) -> int:
    """``T`` as an int, or a ValueError naming the task and the smallest allowed T."""
    if isinstance(T, bool) or not isinstance(T, int) or T < minimum:
        raise ValueError(f"{name} task: T must be an integer >= {minimum}, got {T!r}")
    return T


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size

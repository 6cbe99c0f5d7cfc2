"""The adding problem (Hochreiter & Schmidhuber 1997, in the form of Arjovsky et al. 2016).

Each step carries two features: a value drawn uniformly from [0, 1] and a marker (0 or 1).
Exactly two steps are marked, one in the first half (``[0, T // 2)``) and one in the second
half (``[T // 2, T)``); the target is the sum of the two marked values, read from the model's
output at the final step. The first marked value can lie up to T - 1 steps before the answer,
so the task needs memory across up to T steps.

Baseline: predicting the mean, E[U1 + U2] = 1, gives an MSE of Var(U1 + U2) = Var(U1) + Var(U2)
= 1/12 + 1/12 = 1/6 ~ 0.1667 (independent uniforms on [0, 1], each of variance 1/12).
A prediction counts as right when its absolute error is below 0.04 (H&S's criterion); the task
is solved when the held-out MSE is below 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import check_batch_size, check_T

__all__ = ["AddingTask"]


@dataclass(frozen=True)
class AddingTask:
    """The adding problem of length ``T`` (T >= 2): x ``(B, T, 2)``, target ``(B,)`` float32."""

    T: int
    name: ClassVar[str] = "adding"
    input_size: ClassVar[int] = 2  # (value, marker)
    output_size: ClassVar[int] = 1  # the predicted sum
    kind: ClassVar[str] = "regression"
    baseline: ClassVar[float] = 1.0 / 6.0  # MSE of always predicting the mean, 1.0
    tolerance: ClassVar[float] = 0.04  # |error| below this counts as right (H&S 1997)
    solved_mse: ClassVar[float] = 0.01

    def __post_init__(self):
        check_T(self.name, self.T, 2)

    @property
    def seq_len(self) -> int:
        return self.T

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, None]:
        """``(x (B, T, 2) float32, target (B,) float32, None)``: features are (value, marker)."""
        B, T = check_batch_size(batch_size), self.T
        values = torch.rand(B, T, generator=generator)  # (B, T)
        first = torch.randint(0, T // 2, (B,), generator=generator)
        second = torch.randint(T // 2, T, (B,), generator=generator)
        rows = torch.arange(B)
        markers = torch.zeros(B, T)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        target = values[rows, first] + values[rows, second]  # (B,)
        return torch.stack([values, markers], dim=-1), target, None

    def _final(self, pred: Tensor) -> Tensor:
        if pred.dim() != 3 or pred.shape[-1] != 1:
            raise ValueError(f"adding: pred must be (B, L, 1), got {tuple(pred.shape)}")
        return pred[:, -1, 0]  # only the final step is scored

    def loss(self, pred: Tensor, target: Tensor, mask=None) -> Tensor:
        """Mean squared error of the final step's output."""
        return F.mse_loss(self._final(pred), target.to(pred.dtype))

    @torch.no_grad()
    def metric(self, pred: Tensor, target: Tensor, mask=None) -> dict[str, float]:
        """``{"mse", "accuracy"}``: accuracy is the fraction with |error| < 0.04."""
        err = self._final(pred) - target.to(pred.dtype)
        return {
            "mse": float(err.square().mean()),
            "accuracy": float((err.abs() < self.tolerance).float().mean()),
        }

    def solved(self, metric: dict[str, float]) -> bool:
        return metric["mse"] < self.solved_mse

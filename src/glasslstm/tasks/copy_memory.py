"""The copy memory problem (as in Arjovsky, Shah & Bengio 2016).

Input classes (one-hot, 10): symbols 0..7, blank 8, delimiter 9. A sequence has T + 20 steps:
10 random symbols, T - 1 blanks, the delimiter, 10 blanks. The target is blank at every step
except the last 10, which must reproduce the 10 symbols in order; so the first symbol must be
held for T + 10 steps. Outputs are 9 classes (symbols 0..7 and blank 8; the delimiter is never
a target).

Scoring: cross-entropy averaged over ALL T + 20 steps. The baseline predictor outputs blank
with certainty up to the delimiter and a uniform guess over the 8 symbols afterwards; it pays
ln 8 on each of the last 10 steps and nothing elsewhere: 10 ln 8 / (T + 20). ``accuracy`` is
the fraction of the 10 recalled symbols whose argmax is right. Solved: loss < 0.1 * baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import check_batch_size, check_T

__all__ = ["CopyTask"]

N_SYMBOLS = 8
N_COPY = 10  # symbols to remember
BLANK = N_SYMBOLS  # 8
DELIMITER = N_SYMBOLS + 1  # 9


@dataclass(frozen=True)
class CopyTask:
    """Copy memory with lag ``T`` (T >= 1): x ``(B, T + 20, 10)``, target ``(B, T + 20)`` int64."""

    T: int
    name: ClassVar[str] = "copy"
    input_size: ClassVar[int] = N_SYMBOLS + 2  # symbols, blank, delimiter
    output_size: ClassVar[int] = N_SYMBOLS + 1  # symbols, blank
    kind: ClassVar[str] = "classification"
    blank: ClassVar[int] = BLANK
    delimiter: ClassVar[int] = DELIMITER

    def __post_init__(self):
        check_T(self.name, self.T, 1)

    @property
    def seq_len(self) -> int:
        return self.T + 2 * N_COPY

    @property
    def baseline(self) -> float:
        """Cross-entropy per step of "blank, then uniform over the symbols": 10 ln 8 / (T + 20)."""
        return N_COPY * math.log(N_SYMBOLS) / self.seq_len

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, None]:
        """``(x (B, T + 20, 10) float32 one-hot, target (B, T + 20) int64 in 0..8, None)``."""
        B, L = check_batch_size(batch_size), self.seq_len
        symbols = torch.randint(0, N_SYMBOLS, (B, N_COPY), generator=generator)
        inp = torch.full((B, L), BLANK, dtype=torch.long)
        inp[:, :N_COPY] = symbols
        inp[:, self.T + N_COPY - 1] = DELIMITER  # after the 10 symbols and T - 1 blanks
        target = torch.full((B, L), BLANK, dtype=torch.long)
        target[:, -N_COPY:] = symbols
        return F.one_hot(inp, self.input_size).float(), target, None

    def _check(self, pred: Tensor) -> None:
        if pred.dim() != 3 or pred.shape[1:] != (self.seq_len, self.output_size):
            raise ValueError(
                f"copy: pred must be (B, {self.seq_len}, {self.output_size}), "
                f"got {tuple(pred.shape)}"
            )

    def loss(self, pred: Tensor, target: Tensor, mask=None) -> Tensor:
        """Cross-entropy per step, averaged over all T + 20 steps and the batch."""
        self._check(pred)
        return F.cross_entropy(pred.reshape(-1, self.output_size), target.reshape(-1))

    @torch.no_grad()
    def metric(self, pred: Tensor, target: Tensor, mask=None) -> dict[str, float]:
        """``{"loss", "accuracy"}``: accuracy over the 10 recalled symbols."""
        recalled = pred[:, -N_COPY:].argmax(-1) == target[:, -N_COPY:]
        return {"loss": float(self.loss(pred, target)), "accuracy": float(recalled.float().mean())}

    def solved(self, metric: dict[str, float]) -> bool:
        return metric["loss"] < 0.1 * self.baseline

"""GateTrace: every gate and state of every layer, direction and step, as the model computed them.

Returned by ``glasslstm.LSTM(...)(x, return_gates=True)``. The names follow torch's gate order
and the article (``../docs``' notation table):

==========  ==========================================  =====================
field       article                                      size of last dim
==========  ==========================================  =====================
``i``       input gate i_t                               hidden_size
``f``       forget gate f_t                              hidden_size
``g``       new information (candidate) N_t              hidden_size
``o``       output gate o_t                              hidden_size
``c``       cell state C_t, long-term memory              hidden_size
``h``       hidden state H_t, short-term memory           proj_size or hidden_size
==========  ==========================================  =====================

Each field is a tensor ``(num_layers * num_directions, T, B, size)`` — ``(..., B, T, size)``
when the LSTM is ``batch_first`` — indexed like ``h_n``: entry ``layer * num_directions +
direction``. Steps past a sequence's length are zero. The tensors are detached (for looking
at, not for differentiating) and, to cost nothing extra, may be views into one shared gates
tensor and into the LSTM's output: ``.clone()`` one before changing it in place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

FIELDS = ("i", "f", "g", "o", "c", "h")


@dataclass(frozen=True)
class GateTrace:
    i: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    o: torch.Tensor
    c: torch.Tensor
    h: torch.Tensor
    num_directions: int = 1
    batch_first: bool = False

    @property
    def num_layers(self) -> int:
        return self.i.shape[0] // self.num_directions

    def layer(self, layer: int, direction: int = 0) -> dict[str, torch.Tensor]:
        """The six tensors of one layer and direction, each (T, B, size) (or (B, T, size))."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer={layer} out of range; the trace has {self.num_layers} layers")
        if not 0 <= direction < self.num_directions:
            raise IndexError(
                f"direction={direction} out of range; the trace has {self.num_directions}"
            )
        k = layer * self.num_directions + direction
        return {name: getattr(self, name)[k] for name in FIELDS}

    def numpy(self) -> dict[str, np.ndarray]:
        """The six fields as NumPy arrays (copied to the CPU)."""
        return {name: getattr(self, name).detach().cpu().numpy() for name in FIELDS}

    def to(self, *args, **kwargs) -> GateTrace:
        """A copy with every tensor moved/cast like ``Tensor.to``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in FIELDS:
            moved[name] = moved[name].to(*args, **kwargs)
        return GateTrace(**moved)

    # The article's names, for readers following along.
    @property
    def N(self) -> torch.Tensor:
        """The article's N_t, new information: the same tensor as ``g``."""
        return self.g

    @property
    def C(self) -> torch.Tensor:
        """The article's C_t, cell state: the same tensor as ``c``."""
        return self.c

    @property
    def H(self) -> torch.Tensor:
        """The article's H_t, hidden state: the same tensor as ``h``."""
        return self.h

"""GateTrace: every gate and state of every layer, direction and step, as the model computed them.

Returned by ``glasslstm.LSTM(...)(x, return_gates=True)`` (and by GRU and RNN). For the LSTM
the fields follow torch's gate order and the article (see the notation table in the docs):

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

A GRU records ``r``, ``z``, ``n``, ``h``; a vanilla RNN records ``h``.

Each field is a tensor ``(num_layers * num_directions, T, B, size)`` — ``(..., B, T, size)``
when the module is ``batch_first`` — indexed like ``h_n``: entry ``layer * num_directions +
direction``. Steps past a sequence's length are zero. The tensors are detached (for looking
at, not for differentiating) and, to cost nothing extra, may be views into one shared gates
tensor and into the module's output: ``.clone()`` one before changing it in place.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import torch

LSTM_FIELDS = ("i", "f", "g", "o", "c", "h")


class GateTrace:
    """The recorded fields, as attributes (``trace.f``) and by name (``trace["f"]``)."""

    def __init__(
        self, values: dict[str, torch.Tensor], *, num_directions: int = 1, batch_first: bool = False
    ):
        self._values = dict(values)
        self.num_directions = num_directions
        self.batch_first = batch_first

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._values)

    @property
    def values(self):
        """Read-only mapping: field name -> tensor."""
        return MappingProxyType(self._values)

    def __getattr__(self, name: str) -> torch.Tensor:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"this trace has no {name!r}; it records {', '.join(values)}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._values[name]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._values.items())
        return f"GateTrace({shapes}, num_directions={self.num_directions})"

    @property
    def num_layers(self) -> int:
        return next(iter(self._values.values())).shape[0] // self.num_directions

    def layer(self, layer: int, direction: int = 0) -> dict[str, torch.Tensor]:
        """The fields of one layer and direction, each (T, B, size) (or (B, T, size))."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer={layer} out of range; the trace has {self.num_layers} layers")
        if not 0 <= direction < self.num_directions:
            raise IndexError(
                f"direction={direction} out of range; the trace has {self.num_directions}"
            )
        k = layer * self.num_directions + direction
        return {name: t[k] for name, t in self._values.items()}

    def numpy(self) -> dict[str, np.ndarray]:
        """Every field as a NumPy array (copied to the CPU)."""
        return {name: t.detach().cpu().numpy() for name, t in self._values.items()}

    def to(self, *args, **kwargs) -> GateTrace:
        """A copy with every tensor moved/cast like ``Tensor.to``."""
        return GateTrace(
            {k: v.to(*args, **kwargs) for k, v in self._values.items()},
            num_directions=self.num_directions,
            batch_first=self.batch_first,
        )

    # The article's names, for readers following along (LSTM traces).
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

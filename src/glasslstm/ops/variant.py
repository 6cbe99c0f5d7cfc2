"""The regularised LSTM family, as one layer's time loop sees it: parameters, masks, a bound.

:class:`glasslstm.LSTM` turns its options (``layer_norm``, ``peephole``, ``cell_clip``,
``zoneout_c``/``zoneout_h``, ``recurrent_dropout``) into one :class:`Variant` per layer and
direction and each forward pass, drawing the random masks there with torch's generator; every
path takes it (:func:`glasslstm.ops.lstm_layer`): the C++ operator on the CPU
(``torch.ops.glasslstm.lstm_layer``'s optional arguments, the same names) and the autograd loop
(:func:`glasslstm.ops.loop.lstm_layer_loop`). One step, in the article's notation (a: the four
gates' pre-activations, torch's order i, f, g, o; LN: layer normalisation over the entries)::

    a    = LN(x_t U^T; ln_ih) + LN((H_{t-1} ⊙ h_mask) W^T; ln_hh) + b_ih + b_hh
    i, f = σ(a_i + p_i ⊙ C_{t-1}), σ(a_f + p_f ⊙ C_{t-1});   g = tanh(a_g)
    C̃_t  = clip(f ⊙ C_{t-1} + i ⊙ g, -cell_clip, cell_clip)
    o    = σ(a_o + p_o ⊙ C̃_t)
    H̃_t  = o ⊙ tanh(LN(C̃_t; ln_c, ln_c_bias))                    (then W_hr: LSTMP)
    C_t  = C̃_t + zoneout_c ⊙ (C_{t-1} - C̃_t);   H_t = H̃_t + zoneout_h ⊙ (H_{t-1} - H̃_t)

with ``peephole = [p_i, p_o, p_f]`` (ONNX's order for its input ``P``). What stays outside the
loop — variational dropout on a layer's input and output, DropConnect on ``W_hh`` — is done by
the module with ordinary torch ops. :mod:`glasslstm.reference` has the same equations in NumPy
with their hand-written backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LN_EPS = 1e-5  # layer normalisation's ε, torch.nn.LayerNorm's default (and the kernels')


class Variant(NamedTuple):
    """One layer and direction's part of the family (None / 0: that member is off).

    Parameters (differentiable): ``ln_ih``, ``ln_hh`` (4H) the gains of the normalised input
    and recurrent products; ``ln_c``, ``ln_c_bias`` (H) the gain and bias of the normalised
    cell; ``peephole`` (3H) p_i, p_o, p_f. Masks (constants): ``zoneout_c`` (T, B, H) and
    ``zoneout_h`` (T, B, P) the probability that a unit keeps its previous value — 0 or 1 in
    training, drawn per step; or a scalar tensor z in evaluation (the expectation);
    ``h_mask`` (B, P) recurrent dropout's mask on H_{t-1} (0 or 1/(1-p), one per sequence).
    ``cell_clip``: v > 0 bounds C̃_t to [-v, v].
    """

    ln_ih: torch.Tensor | None = None
    ln_hh: torch.Tensor | None = None
    ln_c: torch.Tensor | None = None
    ln_c_bias: torch.Tensor | None = None
    peephole: torch.Tensor | None = None
    zoneout_c: torch.Tensor | None = None
    zoneout_h: torch.Tensor | None = None
    h_mask: torch.Tensor | None = None
    cell_clip: float = 0.0

    @property
    def tensors(self) -> tuple:
        """Everything but ``cell_clip``, in the operators' argument order."""
        return tuple(self)[:8]

    def active(self) -> bool:
        """Whether any member is on (else the article's cell)."""
        return any(t is not None for t in self.tensors) or self.cell_clip > 0


PARAMS = ("ln_ih", "ln_hh", "ln_c", "ln_c_bias", "peephole")  # the differentiable fields

"""The NumPy reference LSTM: the article's equations line by line, with hand-written BPTT.

This module is the project's oracle. It is plain NumPy (float64 by default), uses no autodiff,
and is written for reading, not speed. Every faster path is tested against it.

Notation (the article writes row vectors: a batch of inputs ``x_t`` is a ``(B, I)`` matrix
and the weights multiply it on the right):

======  ===============================  ==========================================  =========
symbol  meaning                          equation                                    code name
======  ===============================  ==========================================  =========
f_t     forget gate                      f_t = σ(x_t U_f + H_{t-1} W_f + b_f)        ``f``
i_t     input gate                       i_t = σ(x_t U_i + H_{t-1} W_i + b_i)        ``i``
N_t     new information (candidate)      N_t = tanh(x_t U_c + H_{t-1} W_c + b_c)     ``g``
C_t     cell state, long-term memory     C_t = f_t ⊙ C_{t-1} + i_t ⊙ N_t             ``c``
o_t     output gate                      o_t = σ(x_t U_o + H_{t-1} W_o + b_o)        ``o``
H_t     hidden state, short-term memory  H_t = o_t ⊙ tanh(C_t)                       ``h``
======  ===============================  ==========================================  =========

Shapes: ``U_*`` is ``(I, H)`` (input size by hidden size), ``W_*`` is ``(H, H)``, ``b_*`` is
``(H,)``. Here the arrays keep the article's letters (``N``, ``C``, ``H``); the torch engine
uses the code names.

Link to ``torch.nn.LSTM``: ``weight_ih_l{k}`` is ``(4H, I)`` and stacks the gates' rows in
torch's order **i, f, g, o** (g = N_t), so ``U_f = weight_ih[H:2H].T``; likewise ``W_*`` from
``weight_hh_l{k}``. torch keeps two biases, ``bias_ih`` and ``bias_hh``; their sum is the
article's ``b``. :func:`params_from_torch` and :func:`params_to_torch` do this mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

# torch's gate order in weight_ih / weight_hh / bias rows, as article suffixes (c = N_t's weights).
TORCH_GATE_ORDER = ("i", "f", "c", "o")


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) = 1 / (1 + e^-z), branching on the sign so that e^(-|z|) never overflows and
    σ keeps full relative precision in both tails (0.5 (1 + tanh(z/2)) would lose it for z << 0)."""
    e = np.exp(-np.abs(z))  # in (0, 1]
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# ----------------------------------------------------------------------------- parameters


@dataclass
class LayerParams:
    """One layer's weights in the article's notation. U_*: (I, H), W_*: (H, H), b_*: (H,)."""

    U_f: np.ndarray
    U_i: np.ndarray
    U_c: np.ndarray
    U_o: np.ndarray
    W_f: np.ndarray
    W_i: np.ndarray
    W_c: np.ndarray
    W_o: np.ndarray
    b_f: np.ndarray
    b_i: np.ndarray
    b_c: np.ndarray
    b_o: np.ndarray

    # The regularised family's own parameters (None where the layer does not use them; see
    # "The regularised family" below). Vectors over all four gates are in torch's order i, f, c, o.
    gamma_x: np.ndarray | None = None  # (4H) gain of the normalised input product x_t U
    gamma_h: np.ndarray | None = None  # (4H) gain of the normalised recurrent product H_{t-1} W
    gamma_c: np.ndarray | None = None  # (H) gain of the normalised cell, before the output tanh
    beta_c: np.ndarray | None = None  # (H) its bias
    p_i: np.ndarray | None = None  # (H) peephole weights: i and f see C_{t-1}, o sees C_t
    p_f: np.ndarray | None = None
    p_o: np.ndarray | None = None

    NAMES: ClassVar[tuple[str, ...]] = (
        "U_f", "U_i", "U_c", "U_o", "W_f", "W_i", "W_c", "W_o", "b_f", "b_i", "b_c", "b_o",
    )  # fmt: skip
    VARIANT_NAMES: ClassVar[tuple[str, ...]] = (
        "gamma_x", "gamma_h", "gamma_c", "beta_c", "p_i", "p_f", "p_o",
    )  # fmt: skip

    def present(self) -> tuple[str, ...]:
        """The names of the parameters this layer has: NAMES and the variant ones it uses."""
        return self.NAMES + tuple(n for n in self.VARIANT_NAMES if getattr(self, n) is not None)

    @property
    def input_size(self) -> int:
        return self.U_f.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.U_f.shape[1]


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor; no torch import needed here
        t = t.detach().cpu()
    return np.asarray(t, dtype=np.float64)


# glasslstm.LSTM's names for the regularised family's parameters (layer_norm=True, peephole=True).
# With layer normalisation, bias_ih and bias_hh are the biases of the two normalised products,
# so their sum is still the article's b.
VARIANT_TORCH_NAMES = {
    "gamma_x": "ln_weight_ih",
    "gamma_h": "ln_weight_hh",
    "gamma_c": "ln_weight_c",
    "beta_c": "ln_bias_c",
}
PEEPHOLE_TORCH_NAME = "weight_ch"  # (3H): p_i, p_o, p_f, ONNX's order for its input P


def params_from_torch(state_dict: Mapping[str, Any], num_layers: int) -> list[LayerParams]:
    """Convert a unidirectional ``torch.nn.LSTM`` state_dict (tensors or arrays) to the article's
    weights, float64. Missing biases (``bias=False``) count as zeros."""
    layers = []
    for k in range(num_layers):
        if f"weight_ih_l{k}" not in state_dict or f"weight_hh_l{k}" not in state_dict:
            raise ValueError(f"state_dict: missing weight_ih_l{k} or weight_hh_l{k}")
        w_ih = _to_numpy(state_dict[f"weight_ih_l{k}"])  # (4H, I), rows [i; f; g; o]
        w_hh = _to_numpy(state_dict[f"weight_hh_l{k}"])  # (4H, H)
        H = w_hh.shape[1]
        zeros = np.zeros(4 * H)
        b_ih = _to_numpy(state_dict[f"bias_ih_l{k}"]) if f"bias_ih_l{k}" in state_dict else zeros
        b_hh = _to_numpy(state_dict[f"bias_hh_l{k}"]) if f"bias_hh_l{k}" in state_dict else zeros
        b = b_ih + b_hh  # (4H,): the article's b is the sum of torch's two biases
        p = {}
        for j, s in enumerate(TORCH_GATE_ORDER):
            rows = slice(j * H, (j + 1) * H)
            p[f"U_{s}"] = w_ih[rows].T.copy()  # (I, H)
            p[f"W_{s}"] = w_hh[rows].T.copy()  # (H, H)
            p[f"b_{s}"] = b[rows].copy()  # (H,)
        for name, torch_name in VARIANT_TORCH_NAMES.items():
            if f"{torch_name}_l{k}" in state_dict:
                p[name] = _to_numpy(state_dict[f"{torch_name}_l{k}"]).copy()
        if f"{PEEPHOLE_TORCH_NAME}_l{k}" in state_dict:  # ONNX's P: i, o, f
            w = _to_numpy(state_dict[f"{PEEPHOLE_TORCH_NAME}_l{k}"])
            p["p_i"], p["p_o"], p["p_f"] = (w[j * H : (j + 1) * H].copy() for j in range(3))
        layers.append(LayerParams(**p))
    return layers


def params_to_torch(params: list[LayerParams]) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_torch`: torch.nn.LSTM state_dict names -> float64 arrays.
    The whole bias goes to ``bias_ih_l{k}``; ``bias_hh_l{k}`` is zeros."""
    out = {}
    for k, p in enumerate(params):
        out[f"weight_ih_l{k}"] = np.concatenate([getattr(p, f"U_{s}").T for s in TORCH_GATE_ORDER])
        out[f"weight_hh_l{k}"] = np.concatenate([getattr(p, f"W_{s}").T for s in TORCH_GATE_ORDER])
        out[f"bias_ih_l{k}"] = np.concatenate([getattr(p, f"b_{s}") for s in TORCH_GATE_ORDER])
        out[f"bias_hh_l{k}"] = np.zeros(4 * p.hidden_size)
        for name, torch_name in VARIANT_TORCH_NAMES.items():
            if getattr(p, name) is not None:
                out[f"{torch_name}_l{k}"] = getattr(p, name).copy()
        if p.p_i is not None:
            out[f"{PEEPHOLE_TORCH_NAME}_l{k}"] = np.concatenate([p.p_i, p.p_o, p.p_f])
    return out


def init_params(
    input_size: int,
    hidden_size: int,
    num_layers: int,
    rng: np.random.Generator,
    scale: float | None = None,
) -> list[LayerParams]:
    """Every weight and bias uniform(-k, k), k = 1/sqrt(hidden_size) unless ``scale`` is given
    (torch.nn.LSTM's init). Layer k > 0 takes the hidden state of layer k-1 as input."""
    k = 1.0 / np.sqrt(hidden_size) if scale is None else scale
    layers = []
    for layer in range(num_layers):
        I = input_size if layer == 0 else hidden_size
        shapes = {"U": (I, hidden_size), "W": (hidden_size, hidden_size), "b": (hidden_size,)}
        p = {name: rng.uniform(-k, k, size=shapes[name[0]]) for name in LayerParams.NAMES}
        layers.append(LayerParams(**p))
    return layers


# ----------------------------------------------------------------------------- forward


@dataclass
class LayerCache:
    """One layer's values over time, kept for inspection and for the backward pass.
    Gates and states are (T, B, H); ``x`` is the layer's input (T, B, I)."""

    x: np.ndarray  # (T, B, I)
    f: np.ndarray  # (T, B, H) forget gate
    i: np.ndarray  # (T, B, H) input gate
    N: np.ndarray  # (T, B, H) new information (code name g)
    C: np.ndarray  # (T, B, H) cell state
    o: np.ndarray  # (T, B, H) output gate
    H: np.ndarray  # (T, B, H) hidden state
    C_prev: np.ndarray  # (T, B, H) C_{t-1}: C_0 is c0, then C[:-1]
    H_prev: np.ndarray  # (T, B, H) H_{t-1}: H_0 is h0, then H[:-1]


@dataclass
class Cache:
    layers: list[LayerCache]
    params: list[LayerParams]
    variants: list[Variant | None] | None = None  # per layer, when the family is used


def _check_state(name: str, s: np.ndarray | None, L: int, B: int, H: int, dtype) -> np.ndarray:
    if s is None:
        return np.zeros((L, B, H), dtype=dtype)
    s = np.asarray(s, dtype=dtype)
    if s.shape != (L, B, H):
        raise ValueError(f"{name}: got shape {s.shape}, expected (L, B, H) = {(L, B, H)}")
    return s


def layer_forward(x: np.ndarray, p: LayerParams, H0: np.ndarray, C0: np.ndarray) -> LayerCache:
    """One layer over the whole sequence. x: (T, B, I); H0, C0: (B, H)."""
    T, B, _ = x.shape
    Hs = p.hidden_size
    f, i, N, C, o, H, C_prev, H_prev = (np.empty((T, B, Hs), dtype=x.dtype) for _ in range(8))
    H_t, C_t = H0, C0  # (B, H)
    for t in range(T):
        x_t = x[t]  # (B, I)
        H_prev[t], C_prev[t] = H_t, C_t
        f[t] = sigmoid(x_t @ p.U_f + H_t @ p.W_f + p.b_f)  # (B, H)
        i[t] = sigmoid(x_t @ p.U_i + H_t @ p.W_i + p.b_i)  # (B, H)
        N[t] = np.tanh(x_t @ p.U_c + H_t @ p.W_c + p.b_c)  # (B, H)
        C_t = f[t] * C_t + i[t] * N[t]  # (B, H)
        o[t] = sigmoid(x_t @ p.U_o + H_t @ p.W_o + p.b_o)  # (B, H)
        H_t = o[t] * np.tanh(C_t)  # (B, H)
        C[t], H[t] = C_t, H_t
    return LayerCache(x=x, f=f, i=i, N=N, C=C, o=o, H=H, C_prev=C_prev, H_prev=H_prev)


def forward(
    x: np.ndarray,
    params: list[LayerParams],
    h0: np.ndarray | None = None,
    c0: np.ndarray | None = None,
    variants: Sequence[Variant | None] | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], Cache]:
    """Run a stack of LSTM layers over a sequence (time-major, like torch.nn.LSTM by default).

    x: (T, B, I); h0, c0: (L, B, H) or None for zeros. Layer k's input is layer k-1's H over time.
    Computes in x's dtype if it is floating (float64 when given ints or lists).
    Returns ``(H_out, (h_n, c_n), cache)``: H_out (T, B, H) is the last layer's hidden state at
    every step, h_n and c_n (L, B, H) the final states of each layer, and ``cache.layers[k]``
    holds layer k's gates and states (T, B, H) for inspection and :func:`backward`.
    ``variants``: per layer, a :class:`Variant` (the regularised family: layer normalisation,
    peepholes, zoneout, dropout masks, cell clipping) or None for the article's cell; with a
    variational output mask, the next layer (and H_out) reads the masked hidden states.
    """
    x = np.asarray(x)
    x = x.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64, copy=False)
    if not params:
        raise ValueError("params: got an empty list, expected at least one LayerParams")
    if x.ndim != 3:
        raise ValueError(f"x: got shape {x.shape} (rank {x.ndim}), expected rank 3 (T, B, I)")
    T, B, I = x.shape
    if I != params[0].input_size:
        raise ValueError(
            f"x: got shape {x.shape} with {I} features, expected (T, B, {params[0].input_size}) "
            f"to match params[0].U_f rows"
        )
    L, Hs = len(params), params[0].hidden_size
    for k, p in enumerate(params[1:], start=1):
        if p.input_size != Hs or p.hidden_size != Hs:
            raise ValueError(
                f"params[{k}]: got U_f of shape {p.U_f.shape}, expected {(Hs, Hs)} "
                "(layer k > 0 reads layer k-1's hidden state)"
            )
    h0 = _check_state("h0", h0, L, B, Hs, x.dtype)
    c0 = _check_state("c0", c0, L, B, Hs, x.dtype)

    if variants is not None and len(variants) != L:
        raise ValueError(f"variants: got {len(variants)} entries, expected one per layer ({L})")

    layers, inp = [], x
    for k, p in enumerate(params):
        v = None if variants is None else variants[k]
        if v is None:
            lc = layer_forward(inp, p, h0[k], c0[k])
            inp = lc.H  # (T, B, H): the next layer reads this layer's hidden states
        else:
            lc = variant_layer_forward(inp, p, h0[k], c0[k], v)
            inp = lc.Y  # H, or H times the layer's variational output mask
        layers.append(lc)
    if T == 0:  # no steps: the final states are the initial ones
        h_n, c_n = h0.copy(), c0.copy()
    else:
        h_n = np.stack([lc.H[-1] for lc in layers])  # (L, B, H)
        c_n = np.stack([lc.C[-1] for lc in layers])  # (L, B, H)
    cache = Cache(
        layers=layers, params=list(params), variants=None if variants is None else list(variants)
    )
    return inp, (h_n, c_n), cache


# ----------------------------------------------------------------------------- backward


@dataclass
class Grads:
    """dLoss/d(everything). ``layers[k]`` maps LayerParams.NAMES to arrays shaped like the params;
    dx: (T, B, I); dh0, dc0: (L, B, H)."""

    layers: list[dict[str, np.ndarray]]
    dx: np.ndarray
    dh0: np.ndarray
    dc0: np.ndarray


def layer_backward(
    lc: LayerCache, p: LayerParams, dH: np.ndarray, dH_T: np.ndarray, dC_T: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """BPTT through one layer. dH: (T, B, H) gradient reaching H_t from above (the output);
    dH_T, dC_T: (B, H) gradient reaching the final states. Returns (grads, dx, dH_0, dC_0)."""
    g = {name: np.zeros_like(getattr(p, name)) for name in LayerParams.NAMES}
    dx = np.zeros_like(lc.x)  # (T, B, I)
    dH_next, dC_next = dH_T, dC_T  # (B, H): what flows back from step t+1 into H_t and C_t
    for t in reversed(range(lc.x.shape[0])):
        f, i, N, o, C = lc.f[t], lc.i[t], lc.N[t], lc.o[t], lc.C[t]  # (B, H)
        dH_t = dH[t] + dH_next  # (B, H): H_t feeds the output and step t+1
        tanh_C = np.tanh(C)
        # H_t = o_t ⊙ tanh(C_t)
        do = dH_t * tanh_C
        dC = dC_next + dH_t * o * (1.0 - tanh_C**2)  # C_t feeds H_t and C_{t+1}
        # C_t = f_t ⊙ C_{t-1} + i_t ⊙ N_t
        df = dC * lc.C_prev[t]
        di = dC * N
        dN = dC * i
        dC_next = dC * f  # into C_{t-1}
        # through the nonlinearities: σ' = σ(1 - σ), tanh' = 1 - tanh²;
        # da_* = dLoss/d(pre-activation)
        da = {
            "f": df * f * (1.0 - f),
            "i": di * i * (1.0 - i),
            "c": dN * (1.0 - N**2),
            "o": do * o * (1.0 - o),
        }  # each (B, H)
        x_t, H_prev = lc.x[t], lc.H_prev[t]  # (B, I), (B, H)
        dH_next = np.zeros_like(H_prev)
        for s, da_s in da.items():  # a_s = x_t U_s + H_{t-1} W_s + b_s
            g[f"U_{s}"] += x_t.T @ da_s  # (I, H)
            g[f"W_{s}"] += H_prev.T @ da_s  # (H, H)
            g[f"b_{s}"] += da_s.sum(axis=0)  # (H,)
            dx[t] += da_s @ getattr(p, f"U_{s}").T  # (B, I)
            dH_next += da_s @ getattr(p, f"W_{s}").T  # (B, H): into H_{t-1}
    return g, dx, dH_next, dC_next


def backward(
    cache: Cache,
    dH_out: np.ndarray,
    dh_n: np.ndarray | None = None,
    dc_n: np.ndarray | None = None,
) -> Grads:
    """Hand-written backpropagation through time for :func:`forward`.

    dH_out: (T, B, H) dLoss/dH_out (the last layer's output); dh_n, dc_n: (L, B, H)
    dLoss/d final states, None for zeros. Returns every weight's gradient, dx (T, B, I) and
    dh0, dc0 (L, B, H). Goes layer by layer from the top: layer k's dx is the gradient that
    reaches layer k-1's output.
    """
    top = cache.layers[-1]
    T, B, _ = top.H.shape
    L, Hs = len(cache.layers), top.H.shape[2]
    dtype = top.H.dtype
    dH_out = np.asarray(dH_out, dtype=dtype)
    if dH_out.shape != top.H.shape:
        raise ValueError(f"dH_out: got shape {dH_out.shape}, expected (T, B, H) = {top.H.shape}")
    dh_n = _check_state("dh_n", dh_n, L, B, Hs, dtype)
    dc_n = _check_state("dc_n", dc_n, L, B, Hs, dtype)

    layer_grads: list[dict[str, np.ndarray]] = [{} for _ in range(L)]
    dh0, dc0 = np.empty((L, B, Hs), dtype=dtype), np.empty((L, B, Hs), dtype=dtype)
    dH = dH_out
    variants = cache.variants or [None] * L
    for k in reversed(range(L)):
        lc, p, v = cache.layers[k], cache.params[k], variants[k]
        if v is None:
            g, dx, dh0[k], dc0[k] = layer_backward(lc, p, dH, dh_n[k], dc_n[k])
        else:
            assert isinstance(lc, VariantCache)
            g, dx, dh0[k], dc0[k] = variant_layer_backward(lc, p, v, dH, dh_n[k], dc_n[k])
        layer_grads[k] = g
        dH = dx  # (T, B, H) for the layer below, (T, B, I) after the bottom layer
    return Grads(layers=layer_grads, dx=dH, dh0=dh0, dc0=dc0)


# ------------------------------------------------------------------- the regularised family
#
# The members of the family the literature's best LSTMs are built from, each a small change to
# one step (its parameters in LayerParams, its random masks and switches in Variant). With the
# four gates' products side by side, a = [a_i a_f a_c a_o] (torch's order), one step is
#
#   x_t  = x_t ⊙ m_x                            variational input dropout (one mask per sequence)
#   W'   = W ⊙ M_W                              DropConnect on W (one mask per forward)
#   a    = LN(x_t U; γ_x) + LN((H_{t-1} ⊙ m_h) W'; γ_h) + b     (without LN: x_t U + ... W' + b)
#                                               layer normalisation; m_h: recurrent dropout
#   i    = σ(a_i + p_i ⊙ C_{t-1})   f = σ(a_f + p_f ⊙ C_{t-1})   N = tanh(a_c)      peepholes
#   C̃_t  = clip(f ⊙ C_{t-1} + i ⊙ N, -v, v)     cell clipping
#   o    = σ(a_o + p_o ⊙ C̃_t)
#   H̃_t  = o ⊙ tanh(LN(C̃_t; γ_c, β_c))
#   C_t  = k^c_t ⊙ C_{t-1} + (1 - k^c_t) ⊙ C̃_t    zoneout (k: 1 where a unit keeps its value)
#   H_t  = k^h_t ⊙ H_{t-1} + (1 - k^h_t) ⊙ H̃_t
#   Y_t  = H_t ⊙ m_y                            variational output dropout
#
# LN(z; γ, β) = γ ⊙ (z - mean(z)) / sqrt(var(z) + ε) + β over the vector's entries (4H values
# for the products, H for the cell), ε = 1e-5 (Ba et al. 2016, "Layer normalization"; haste's
# LayerNormLSTM). The products' biases β are b (torch: bias_ih and bias_hh). Zoneout follows
# Krueger et al. 2016: the output H̃_t reads the new cell C̃_t, not the zoned-out state.


EPS = 1e-5  # layer normalisation's ε (torch.nn.LayerNorm's default)


@dataclass
class Variant:
    """Which members of the family one layer uses, and the random masks of one forward pass.

    Masks hold what multiplies: dropout masks are 0 or 1/(1-p) (inverted dropout), zoneout
    masks the probability k that a unit keeps its previous value (0 or 1 in training, the
    zoneout probability z in evaluation: the expectation). None: not used.
    """

    layer_norm: bool = False
    peephole: bool = False
    cell_clip: float = 0.0  # v > 0 clips C̃_t to [-v, v]; 0: no clipping
    zoneout_c: np.ndarray | float | None = None  # (T, B, H) k^c, or the scalar z
    zoneout_h: np.ndarray | float | None = None  # (T, B, H) k^h, or the scalar z
    h_mask: np.ndarray | None = None  # (B, H) m_h: recurrent (variational) dropout on H_{t-1}
    W_mask: np.ndarray | None = None  # (H, 4H) M_W: DropConnect on W = [W_i W_f W_c W_o]
    x_mask: np.ndarray | None = None  # (B, I) m_x: variational dropout on the layer's input
    y_mask: np.ndarray | None = None  # (B, H) m_y: variational dropout on the layer's output


@dataclass
class VariantCache(LayerCache):
    """LayerCache plus what the family's backward needs. ``x`` is the input after m_x."""

    Y: np.ndarray = None  # type: ignore[assignment]  # (T, B, H) the layer's output H ⊙ m_y
    C_new: np.ndarray = None  # type: ignore[assignment]  # (T, B, H) C̃_t before clipping
    tanh_n: np.ndarray = None  # type: ignore[assignment]  # (T, B, H) tanh(LN(C̃_t))
    ax_hat: np.ndarray | None = None  # (T, B, 4H) normalised x_t U
    ah_hat: np.ndarray | None = None  # (T, B, 4H) normalised (H_{t-1} ⊙ m_h) W'
    n_hat: np.ndarray | None = None  # (T, B, H) normalised C̃_t
    rstd: np.ndarray | None = None  # (T, B, 3) 1 / sqrt(var + ε) of the three


def _gates(p: LayerParams, kind: str) -> np.ndarray:
    """U (I, 4H), W (H, 4H) or b (4H): the four gates side by side in torch's order."""
    return np.concatenate([getattr(p, f"{kind}_{s}") for s in TORCH_GATE_ORDER], axis=-1)


def _ln(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of z normalised: ((z - mean) / sqrt(var + ε), 1 / sqrt(var + ε) (rows, 1))."""
    mu = z.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((z - mu) ** 2).mean(axis=-1, keepdims=True) + EPS)
    return (z - mu) * rstd, rstd


def _ln_backward(dz_hat: np.ndarray, z_hat: np.ndarray, rstd: np.ndarray) -> np.ndarray:
    """dL/dz from dL/dz_hat, z_hat = (z - mean) rstd: mean and variance depend on every entry."""
    m1 = dz_hat.mean(axis=-1, keepdims=True)
    m2 = (dz_hat * z_hat).mean(axis=-1, keepdims=True)
    return rstd * (dz_hat - m1 - z_hat * m2)


def _at_step(mask: np.ndarray | float | None, t: int) -> np.ndarray | float:
    """A zoneout mask's step t: its (B, H) slice, or the scalar z (evaluation), or 0 (off)."""
    if mask is None:
        return 0.0
    return mask[t] if isinstance(mask, np.ndarray) and mask.ndim == 3 else float(mask)


def _check_variant(p: LayerParams, v: Variant) -> None:
    need = {
        "layer_norm": ("gamma_x", "gamma_h", "gamma_c", "beta_c"),
        "peephole": ("p_i", "p_f", "p_o"),
    }
    for flag, names in need.items():
        missing = [n for n in names if getattr(p, n) is None]
        if getattr(v, flag) and missing:
            raise ValueError(f"Variant.{flag}: the layer's params lack {', '.join(missing)}")


def variant_layer_forward(
    x: np.ndarray, p: LayerParams, H0: np.ndarray, C0: np.ndarray, v: Variant
) -> VariantCache:
    """One layer of the family over the whole sequence. x: (T, B, I); H0, C0: (B, H)."""
    _check_variant(p, v)
    T, B, _ = x.shape
    Hs = p.hidden_size
    if v.x_mask is not None:
        x = x * v.x_mask  # the same mask at every step
    U, b = _gates(p, "U"), _gates(p, "b")  # (I, 4H), (4H)
    W = _gates(p, "W") if v.W_mask is None else _gates(p, "W") * v.W_mask  # (H, 4H)
    new = {n: np.empty((T, B, Hs), dtype=x.dtype) for n in ("f", "i", "N", "C", "o", "H")}
    new.update(
        {n: np.empty((T, B, Hs), dtype=x.dtype) for n in ("C_prev", "H_prev", "C_new", "tanh_n")}
    )
    ln = v.layer_norm
    ax_hat = np.empty((T, B, 4 * Hs), dtype=x.dtype) if ln else None
    ah_hat = np.empty((T, B, 4 * Hs), dtype=x.dtype) if ln else None
    n_hat = np.empty((T, B, Hs), dtype=x.dtype) if ln else None
    rstd = np.empty((T, B, 3), dtype=x.dtype) if ln else None
    H_t, C_t = H0, C0
    for t in range(T):
        new["H_prev"][t], new["C_prev"][t] = H_t, C_t
        Hr = H_t if v.h_mask is None else H_t * v.h_mask  # recurrent dropout
        ax, ah = x[t] @ U, Hr @ W  # (B, 4H) each
        if ln:
            assert ax_hat is not None and ah_hat is not None and rstd is not None
            ax_hat[t], sx = _ln(ax)
            ah_hat[t], sh = _ln(ah)
            rstd[t, :, :1], rstd[t, :, 1:2] = sx, sh
            a = p.gamma_x * ax_hat[t] + p.gamma_h * ah_hat[t] + b
        else:
            a = ax + ah + b
        a_i, a_f, a_c, a_o = np.split(a, 4, axis=1)
        if v.peephole:  # i and f see C_{t-1}
            a_i = a_i + p.p_i * C_t
            a_f = a_f + p.p_f * C_t
        i, f, N = sigmoid(a_i), sigmoid(a_f), np.tanh(a_c)
        C_new = f * C_t + i * N  # C̃_t
        Cn = C_new if not v.cell_clip else np.clip(C_new, -v.cell_clip, v.cell_clip)
        if v.peephole:  # o sees C_t (the new cell)
            a_o = a_o + p.p_o * Cn
        o = sigmoid(a_o)
        if ln:
            assert n_hat is not None and rstd is not None
            n_hat[t], sc = _ln(Cn)
            rstd[t, :, 2:] = sc
            n = p.gamma_c * n_hat[t] + p.beta_c
        else:
            n = Cn
        tanh_n = np.tanh(n)
        H_new = o * tanh_n  # H̃_t
        kc, kh = _at_step(v.zoneout_c, t), _at_step(v.zoneout_h, t)
        C_t = kc * C_t + (1.0 - kc) * Cn  # zoneout: a unit keeps its value with probability z
        H_t = kh * H_t + (1.0 - kh) * H_new
        for name, val in (("i", i), ("f", f), ("N", N), ("o", o), ("C", C_t), ("H", H_t)):
            new[name][t] = val
        new["C_new"][t], new["tanh_n"][t] = C_new, tanh_n
    Y = new["H"] if v.y_mask is None else new["H"] * v.y_mask
    return VariantCache(x=x, Y=Y, ax_hat=ax_hat, ah_hat=ah_hat, n_hat=n_hat, rstd=rstd, **new)


def variant_layer_backward(
    lc: VariantCache, p: LayerParams, v: Variant, dY: np.ndarray, dH_T: np.ndarray, dC_T: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """BPTT through one layer of the family: :func:`layer_backward`'s contract (dY: the
    gradient reaching the layer's output Y), and the variant parameters' gradients too."""
    g = {name: np.zeros_like(getattr(p, name)) for name in p.present()}
    U = _gates(p, "U")
    W = _gates(p, "W") if v.W_mask is None else _gates(p, "W") * v.W_mask
    dU, dW, db = np.zeros_like(U), np.zeros_like(W), np.zeros(U.shape[1])
    dH_above = dY if v.y_mask is None else dY * v.y_mask
    dx = np.zeros_like(lc.x)
    dH_next, dC_next = dH_T, dC_T
    clip = v.cell_clip
    for t in reversed(range(lc.x.shape[0])):
        f, i, N, o, tanh_n = lc.f[t], lc.i[t], lc.N[t], lc.o[t], lc.tanh_n[t]
        C_prev, C_new = lc.C_prev[t], lc.C_new[t]
        Cn = C_new if not clip else np.clip(C_new, -clip, clip)
        dH_t = dH_above[t] + dH_next  # H_t feeds the output and step t+1
        kh, kc = _at_step(v.zoneout_h, t), _at_step(v.zoneout_c, t)
        dH_new = (1.0 - kh) * dH_t  # H_t = k H_{t-1} + (1 - k) H̃_t
        dH_prev = kh * dH_t  # the part that skips the step
        do = dH_new * tanh_n  # H̃_t = o ⊙ tanh(n)
        dn = dH_new * o * (1.0 - tanh_n**2)
        if v.layer_norm:
            assert lc.n_hat is not None and lc.rstd is not None
            g["gamma_c"] += (dn * lc.n_hat[t]).sum(axis=0)
            g["beta_c"] += dn.sum(axis=0)
            dCn = _ln_backward(dn * p.gamma_c, lc.n_hat[t], lc.rstd[t, :, 2:])
        else:
            dCn = dn
        da_o = do * o * (1.0 - o)
        if v.peephole:  # a_o = ... + p_o ⊙ C̃_t
            dCn = dCn + da_o * p.p_o
            g["p_o"] += (da_o * Cn).sum(axis=0)
        dCn = dCn + (1.0 - kc) * dC_next  # C_t = k C_{t-1} + (1 - k) C̃_t
        dC_prev = kc * dC_next
        if clip:  # the clipped entries pass no gradient (torch.clamp's convention at the bounds)
            dCn = dCn * (np.abs(C_new) <= clip)
        # C̃_t = f ⊙ C_{t-1} + i ⊙ N
        dC_prev = dC_prev + dCn * f
        da_i = dCn * N * i * (1.0 - i)
        da_f = dCn * C_prev * f * (1.0 - f)
        da_c = dCn * i * (1.0 - N**2)
        if v.peephole:  # a_i, a_f = ... + p ⊙ C_{t-1}
            dC_prev = dC_prev + da_i * p.p_i + da_f * p.p_f
            g["p_i"] += (da_i * C_prev).sum(axis=0)
            g["p_f"] += (da_f * C_prev).sum(axis=0)
        da = np.concatenate([da_i, da_f, da_c, da_o], axis=1)  # (B, 4H)
        db += da.sum(axis=0)
        if v.layer_norm:
            assert lc.ax_hat is not None and lc.ah_hat is not None and lc.rstd is not None
            g["gamma_x"] += (da * lc.ax_hat[t]).sum(axis=0)
            g["gamma_h"] += (da * lc.ah_hat[t]).sum(axis=0)
            dax = _ln_backward(da * p.gamma_x, lc.ax_hat[t], lc.rstd[t, :, :1])
            dah = _ln_backward(da * p.gamma_h, lc.ah_hat[t], lc.rstd[t, :, 1:2])
        else:
            dax = dah = da
        Hr = lc.H_prev[t] if v.h_mask is None else lc.H_prev[t] * v.h_mask
        dU += lc.x[t].T @ dax
        dW += Hr.T @ dah
        dx[t] = dax @ U.T
        dHr = dah @ W.T
        dH_next = dH_prev + (dHr if v.h_mask is None else dHr * v.h_mask)
        dC_next = dC_prev
    if v.W_mask is not None:
        dW = dW * v.W_mask  # the gradient reaches only the weights that were kept
    if v.x_mask is not None:
        dx = dx * v.x_mask
    Hs = p.hidden_size
    for j, s in enumerate(TORCH_GATE_ORDER):
        cols = slice(j * Hs, (j + 1) * Hs)
        g[f"U_{s}"], g[f"W_{s}"], g[f"b_{s}"] = dU[:, cols], dW[:, cols], db[cols]
    return g, dx, dH_next, dC_next


def init_variant_params(
    p: LayerParams, layer_norm: bool, peephole: bool, rng: np.random.Generator
) -> LayerParams:
    """``p`` with the family's parameters added: gains near 1 and biases near 0 (random, so
    that a test exercises every entry) for layer normalisation, small peephole weights."""
    H = p.hidden_size
    extra: dict[str, np.ndarray] = {}
    if layer_norm:
        extra.update(
            gamma_x=1.0 + 0.3 * rng.standard_normal(4 * H),
            gamma_h=1.0 + 0.3 * rng.standard_normal(4 * H),
            gamma_c=1.0 + 0.3 * rng.standard_normal(H),
            beta_c=0.3 * rng.standard_normal(H),
        )
    if peephole:
        extra.update({n: 0.5 * rng.standard_normal(H) for n in ("p_i", "p_f", "p_o")})
    return LayerParams(**{n: getattr(p, n) for n in p.present()}, **extra)


# ---- the embedding in front of the LSTM, with embedding dropout ------------------------------
#
# A language model's input x_t is row idx_t of the embedding matrix E (V, I). Embedding dropout
# (Gal & Ghahramani 2016; Merity et al. 2017's dropoute) drops whole token types: one draw per
# row of E, m_e (V,) 0 or 1/(1-p), the same at every occurrence of the token in the batch:
#
#     x_t = E[idx_t] ⊙ m_e[idx_t]          dL/dE[v] = Σ_{t,b: idx = v} m_e[v] dL/dx_t[b]


def embed_forward(E: np.ndarray, idx: np.ndarray, row_mask: np.ndarray | None = None) -> np.ndarray:
    """``idx`` (T, B) token ids -> x (T, B, I): rows of E, each scaled by its token's mask
    entry (``row_mask`` (V,): embedding dropout; None: off)."""
    x = E[idx]
    return x if row_mask is None else x * row_mask[idx][..., None]


def embed_backward(
    dx: np.ndarray, idx: np.ndarray, vocab_size: int, row_mask: np.ndarray | None = None
) -> np.ndarray:
    """dL/dE (V, I) from dL/dx (T, B, I): each position's gradient added to its token's row
    (scaled by that token's mask entry); rows of tokens not in ``idx`` get 0."""
    g = dx if row_mask is None else dx * row_mask[idx][..., None]
    dE = np.zeros((vocab_size, dx.shape[-1]), dtype=dx.dtype)
    np.add.at(dE, idx.reshape(-1), g.reshape(-1, dx.shape[-1]))
    return dE

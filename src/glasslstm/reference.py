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

from collections.abc import Mapping
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

    NAMES: ClassVar[tuple[str, ...]] = (
        "U_f", "U_i", "U_c", "U_o", "W_f", "W_i", "W_c", "W_o", "b_f", "b_i", "b_c", "b_o",
    )  # fmt: skip

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
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], Cache]:
    """Run a stack of LSTM layers over a sequence (time-major, like torch.nn.LSTM by default).

    x: (T, B, I); h0, c0: (L, B, H) or None for zeros. Layer k's input is layer k-1's H over time.
    Computes in x's dtype if it is floating (float64 when given ints or lists).
    Returns ``(H_out, (h_n, c_n), cache)``: H_out (T, B, H) is the last layer's hidden state at
    every step, h_n and c_n (L, B, H) the final states of each layer, and ``cache.layers[k]``
    holds layer k's gates and states (T, B, H) for inspection and :func:`backward`.
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

    layers, inp = [], x
    for k, p in enumerate(params):
        lc = layer_forward(inp, p, h0[k], c0[k])
        layers.append(lc)
        inp = lc.H  # (T, B, H): the next layer reads this layer's hidden states
    if T == 0:  # no steps: the final states are the initial ones
        h_n, c_n = h0.copy(), c0.copy()
    else:
        h_n = np.stack([lc.H[-1] for lc in layers])  # (L, B, H)
        c_n = np.stack([lc.C[-1] for lc in layers])  # (L, B, H)
    return inp, (h_n, c_n), Cache(layers=layers, params=list(params))


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
    for k in reversed(range(L)):
        g, dx, dh0[k], dc0[k] = layer_backward(
            cache.layers[k], cache.params[k], dH, dh_n[k], dc_n[k]
        )
        layer_grads[k] = g
        dH = dx  # (T, B, H) for the layer below, (T, B, I) after the bottom layer
    return Grads(layers=layer_grads, dx=dH, dh0=dh0, dc0=dc0)

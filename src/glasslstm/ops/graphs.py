"""CUDA graphs for a recurrent module: its whole forward and its whole backward, one replay each.

An LSTM layer's time loop is T small GEMMs and T cell kernels each way, so at small batch sizes
a step costs more in launches (Python, torch's dispatcher, the driver) than on the GPU.
:func:`graphed` captures forward and backward once, with
:func:`torch.cuda.make_graphed_callables`, and from then on replays them: one launch each way.

    lstm = glasslstm.LSTM(512, 512, backend="fused").cuda()
    x = torch.randn(100, 64, 512, device="cuda", requires_grad=True)
    step = graphed(lstm, (x,), return_gates=True)
    out, (h_n, c_n), trace = step(x)          # replays; trace.f, trace.c ... as usual
    out.sum().backward()                      # replays the captured backward

What a capture needs (CUDA graphs replay fixed work on fixed memory):

* Fixed shapes, dtypes and devices: every call passes tensors shaped like ``sample_args`` (checked,
  with a clear error). New values are copied into the captured inputs.
* Full-length batches only. Ragged input (``lengths=``, a ``PackedSequence``) is not graphable:
  the sort by length copies indices between host and device and the per-step batch sizes are
  host data that shape the loop (``_pad_mask`` builds a device tensor from a Python list).
* The results live in the graph's memory: the next call overwrites them (output, states and the
  trace alike). Run backward before the next call, and ``.clone()`` what you keep.
* Training mode as at capture; in the other mode the module runs eagerly (torch's rule).
  Parameters must stay where they are (no ``.to()`` after capture); optimizers update them in
  place, which the graphs see.
* Under ``torch.autocast``, ``cache_enabled=False`` (a torch requirement).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree

from glasslstm.trace import GateTrace

NOT_GRAPHABLE = (
    "ragged input (lengths= or a PackedSequence) is not graphable: the sort by "
    "length and the per-step batch sizes need the host; pad every sequence to the "
    "full length, or run the module without graphs"
)


class _Flat(nn.Module):
    """The module with fixed keyword arguments, returning only tensors (a GateTrace becomes a
    dict of its fields, which torch's pytree utilities can flatten)."""

    def __init__(self, module: nn.Module, kwargs: dict):
        super().__init__()
        self.inner = module
        self.kwargs = kwargs
        self.trace_meta: dict | None = None

    def forward(self, *args):
        res = self.inner(*args, **self.kwargs)
        if isinstance(res, tuple) and res and isinstance(res[-1], GateTrace):
            trace = res[-1]
            self.trace_meta = {
                "num_directions": trace.num_directions,
                "batch_first": trace.batch_first,
            }
            return res[:-1] + (dict(trace.values),)
        return res


class GraphedModule(nn.Module):
    """``module`` replaying its forward and backward as CUDA graphs (see :func:`graphed`).

    Call it like the module, with positional tensors laid out as ``sample_args``. Its
    parameters are the module's (``self.module``), so optimizers work as before; save
    ``self.module.state_dict()`` (this module's keys carry a ``module.`` prefix).
    """

    def __init__(
        self,
        module: nn.Module,
        sample_args: tuple,
        return_gates: bool = False,
        num_warmup_iters: int = 3,
        allow_unused_input: bool = False,
        pool=None,
    ):
        super().__init__()
        if not isinstance(sample_args, tuple):
            raise TypeError(
                f"sample_args must be a tuple of the module's positional arguments; "
                f"got {type(sample_args).__name__}"
            )
        if any(isinstance(a, PackedSequence) for a in sample_args):
            raise ValueError(NOT_GRAPHABLE)
        leaves, spec = _pytree.tree_flatten(sample_args)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise TypeError(
                "sample_args must hold tensors only (tuples of tensors allowed, as "
                f"for hx); got {[type(t).__name__ for t in leaves]}"
            )
        where = {t.device for t in leaves} | {p.device for p in module.parameters()}
        if any(d.type != "cuda" for d in where) or len(where) != 1:
            raise ValueError(
                "CUDA graphs need the module and sample_args on one CUDA device; "
                f"got {sorted(str(d) for d in where)}"
            )
        self.module = module
        self.return_gates = return_gates
        self._spec = spec
        self._layout = [(tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in leaves]
        flat = _Flat(module, {"return_gates": True} if return_gates else {})
        flat.train(module.training)
        try:
            with warnings.catch_warnings():
                # torch warns when an earlier eager step's AccumulateGrad nodes are still alive
                # (its stream differs from the capture stream): a possible extra sync, not an
                # error — but under warnings-as-errors it would abort the capture half-way and
                # leave the CUDA RNG in capture mode (seen on an H100 under pytest).
                warnings.filterwarnings("ignore", message=".*AccumulateGrad node's stream")
                torch.cuda.make_graphed_callables(
                    flat,
                    sample_args,
                    num_warmup_iters=num_warmup_iters,
                    allow_unused_input=allow_unused_input,
                    pool=pool,
                )
        except RuntimeError as e:
            if "captur" not in str(e).lower():
                raise
            raise RuntimeError(
                f"capturing {type(module).__name__} as a CUDA graph failed: {e}\nForward and "
                "backward must stay on the GPU with fixed shapes: no .item()/.tolist()/.cpu(), "
                "no host-to-device copies (" + NOT_GRAPHABLE + ")"
            ) from e
        # Not a registered submodule: self.module already owns the parameters.
        self.__dict__["_flat"] = flat

    def forward(self, *args, **kwargs):
        if kwargs:
            raise TypeError(
                f"a graphed module takes the positional tensors of its sample_args "
                f"only; got keyword arguments {sorted(kwargs)}"
                + (f" ({NOT_GRAPHABLE})" if "lengths" in kwargs else "")
            )
        if any(isinstance(a, PackedSequence) for a in args):
            raise ValueError(NOT_GRAPHABLE)
        leaves, spec = _pytree.tree_flatten(args)
        if spec != self._spec:
            raise ValueError(
                f"graphed for arguments laid out as {_compact(self._spec)}; got "
                f"{_compact(spec)} (same nesting as sample_args, e.g. (x, (h0, c0)))"
            )
        for k, (t, (shape, dtype, device, grad)) in enumerate(zip(leaves, self._layout)):
            if not isinstance(t, torch.Tensor) or (
                tuple(t.shape),
                t.dtype,
                t.device,
                t.requires_grad,
            ) != (shape, dtype, device, grad):
                got = (
                    f"{tuple(t.shape)} {t.dtype} on {t.device}, requires_grad={t.requires_grad}"
                    if isinstance(t, torch.Tensor)
                    else type(t).__name__
                )
                raise ValueError(
                    f"argument tensor {k}: graphed for {shape} {dtype} on {device}, "
                    f"requires_grad={grad}; got {got}. A CUDA graph replays fixed shapes: graph "
                    "one module per shape"
                )
        flat = self.__dict__["_flat"]
        flat.training = self.module.training  # the other mode runs eagerly (torch's rule)
        res = flat(*args)
        if self.return_gates:
            values = {k: v.detach() for k, v in res[-1].items()}
            res = res[:-1] + (GateTrace(values, **flat.trace_meta),)
        return res


def _compact(spec) -> str:
    return " ".join(str(spec).split())


def graphed(
    module: nn.Module,
    sample_args: tuple,
    *,
    return_gates: bool = False,
    num_warmup_iters: int = 3,
    allow_unused_input: bool = False,
    pool=None,
) -> GraphedModule:
    """``module`` with its forward and backward captured as CUDA graphs, for fixed shapes.

    Args:
        module: a :class:`glasslstm.LSTM` (or any module whose forward takes tensors and
            returns tensors, tuples of them, and for glasslstm modules a GateTrace), on CUDA.
        sample_args: the positional arguments of a typical call, e.g. ``(x,)`` or
            ``(x, (h_0, c_0))``: tensors with the shapes, dtypes and ``requires_grad`` every
            later call will have. They are run ``num_warmup_iters`` times (on a side stream)
            before capture, and gradients of these runs are not kept.
        return_gates: call the module with ``return_gates=True``; the result then ends with a
            :class:`~glasslstm.trace.GateTrace` as usual (detached, in graph memory).
        num_warmup_iters, allow_unused_input, pool: passed to
            :func:`torch.cuda.make_graphed_callables`.

    Returns:
        A :class:`GraphedModule`: call it like the module. See this module's docstring for what
        capture requires (ragged input is rejected with a clear error).
    """
    return GraphedModule(
        module,
        sample_args,
        return_gates=return_gates,
        num_warmup_iters=num_warmup_iters,
        allow_unused_input=allow_unused_input,
        pool=pool,
    )

"""The web inspector's forward pass, cached by prefix: a text that begins like one seen before
runs the model only from where it differs.

Someone typing into the inspector sends the same long text again and again with a change near
the end; at 2,000 characters the forward pass over all of it costs a large model a noticeable
fraction of a second, every keystroke. So a text's tokens are cut into chunks of
:data:`CHUNK` tokens, and what the inspector shows about each chunk is kept: every gate and
state of every layer at each token (float16: the page shows three digits), the model's top
guesses after each token, the next-token distribution after the chunk's last token, and the
LSTM state ``(h, c)`` there (float32, exact). A chunk is keyed by a hash of *every* token up to
its end, so it is reused only where all that came before it is the same; the model then runs
from the stored state over the rest. The last chunk of a text is always computed (it gives the
distribution after the last token), so the first request for a text costs one full forward
pass and the next, one chunk or two.

The cache holds at most ``max_bytes`` (least recently used chunks go first). Resuming from a
stored state gives the values an uninterrupted pass gives, up to float32 rounding (the batched
input projection may round differently) and the float16 storage.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from glasslstm.inspection.common import QUANTITIES
from glasslstm.model import LanguageModel

CHUNK = 32  # tokens a chunk: a keystroke recomputes 1-2 chunks; one dict entry per 32 tokens
GUESSES = 3  # next-token guesses kept after each token (the page shows them on hover)
F16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Chunk:
    """What the inspector shows about ``n`` consecutive tokens."""

    gates: np.ndarray  # (6, L, n, H) float16, QUANTITIES order
    guess_ids: np.ndarray  # (n, GUESSES) int64: the likeliest next tokens after each token
    guess_p: np.ndarray  # (n, GUESSES) float32: their probabilities
    target: np.ndarray  # (n,) float32: P(token t + 1) after token t; the last one is NaN
    last_probs: np.ndarray  # (V,) float32: the next-token distribution after the last token
    state: tuple[torch.Tensor, torch.Tensor]  # (h, c) after the last token, each (L, 1, H)

    @property
    def nbytes(self) -> int:
        arrays = (self.gates, self.guess_ids, self.guess_p, self.target, self.last_probs)
        tensors = sum(t.numel() * t.element_size() for t in self.state)
        return sum(a.nbytes for a in arrays) + tensors + 200  # + the objects themselves


@dataclass
class Run:
    """A text's tokens and its chunks: the model's view of every token."""

    ids: list[int]
    chunks: list[Chunk]

    def __len__(self) -> int:
        return len(self.ids)

    def values(self, quantity: str, layer: int, cells=None) -> np.ndarray:
        """``(T, len(cells))`` float16 (as kept): one quantity of one layer (all cells if
        ``cells`` is None)."""
        q = QUANTITIES.index(quantity)
        sel = slice(None) if cells is None else np.asarray(cells, dtype=np.int64)
        return np.concatenate([c.gates[q, layer][:, sel] for c in self.chunks])

    def guesses(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (T, GUESSES), probabilities (T, GUESSES))``: the likeliest next tokens."""
        return (
            np.concatenate([c.guess_ids for c in self.chunks]),
            np.concatenate([c.guess_p for c in self.chunks]),
        )

    def target_prob(self) -> np.ndarray:
        """``(T,)`` float64: the probability given to the token that came next (NaN at the end)."""
        out = np.concatenate([c.target for c in self.chunks]).astype(np.float64)
        t = -1
        for c in self.chunks[:-1]:  # a chunk's last token: its successor opens the next chunk
            t += len(c.target)
            out[t] = c.last_probs[self.ids[t + 1]]
        return out

    def next_probs(self) -> np.ndarray:
        """``(V,)`` the next-token distribution after the last token."""
        return self.chunks[-1].last_probs


class PrefixCache:
    """``run(ids) -> Run`` for ``model``, reusing the chunks of earlier texts (see the module
    docstring). Thread-safe: one forward pass at a time (``model_lock``), lookups under a lock
    of their own."""

    def __init__(
        self,
        model: LanguageModel,
        *,
        max_bytes: int,
        chunk: int = CHUNK,
        model_lock: threading.Lock | None = None,
    ):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1; got {chunk}")
        self.model, self.max_bytes, self.chunk = model, max(0, max_bytes), chunk
        self.model_lock = model_lock or threading.Lock()
        self._chunks: OrderedDict[bytes, Chunk] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0  # chunks reused / computed (for the benchmark's report)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._chunks)

    def _keys(self, ids: np.ndarray, n: int) -> list[bytes]:
        keys, key = [], b""
        for k in range(n):
            part = ids[k * self.chunk : (k + 1) * self.chunk].tobytes()
            key = hashlib.blake2b(key + part, digest_size=16).digest()
            keys.append(key)
        return keys

    def run(self, ids: list[int]) -> Run:
        if not ids:
            raise ValueError("the text has no tokens; give at least one")
        arr = np.asarray(ids, dtype=np.int64)
        cacheable = (len(arr) - 1) // self.chunk  # whole chunks before the last token's chunk
        keys = self._keys(arr, cacheable)
        chunks: list[Chunk] = []
        with self._lock:
            for key in keys:
                found = self._chunks.get(key)
                if found is None:
                    break
                self._chunks.move_to_end(key)
                chunks.append(found)
            self.hits += len(chunks)
        start = len(chunks) * self.chunk
        state = chunks[-1].state if chunks else None
        with self.model_lock:
            fresh = self._forward(arr[start:], state)
        self._store(keys[len(chunks) :], fresh)
        return Run(list(ids), chunks + fresh)

    def _store(self, keys: list[bytes], fresh: list[Chunk]) -> None:
        with self._lock:
            self.misses += len(fresh)
            for key, c in zip(keys, fresh):  # the text's last chunk has no key: never stored
                if key in self._chunks or c.nbytes > self.max_bytes:
                    continue
                self._chunks[key] = c
                self._bytes += c.nbytes
            while self._bytes > self.max_bytes and self._chunks:
                _, old = self._chunks.popitem(last=False)
                self._bytes -= old.nbytes

    @torch.no_grad()
    def _forward(self, ids: np.ndarray, state) -> list[Chunk]:
        """The model over ``ids`` from ``state``, cut into chunks of ``self.chunk`` tokens."""
        model = self.model
        x = torch.as_tensor(ids, device=model.device)[None]  # (1, n)
        if state is not None:
            state = tuple(s.to(model.device) for s in state)
        logits, _, _, trace = model(x, state, return_gates=True)
        probs = torch.softmax(logits[0].float(), -1)  # (n, V)
        g_p, g_ids = probs.topk(min(GUESSES, probs.shape[-1]), dim=-1)
        target = torch.full((len(ids),), float("nan"))
        target[:-1] = probs[:-1].gather(1, x[0, 1:, None])[:, 0].cpu()
        fields = [trace[q][:, 0] for q in QUANTITIES]  # each (L, n, H)
        gates = torch.stack(fields).float().clamp_(-F16_MAX, F16_MAX).cpu().numpy()
        gates = gates.astype(np.float16)
        h, c = trace["h"][:, 0].float(), trace["c"][:, 0].float()  # (L, n, H)
        probs_np, g_ids_np, g_p_np = probs.cpu().numpy(), g_ids.cpu().numpy(), g_p.cpu().numpy()
        target_np = target.numpy()
        out = []
        for a in range(0, len(ids), self.chunk):
            b = min(a + self.chunk, len(ids))
            tgt = target_np[a:b].copy()
            tgt[-1] = np.nan  # its successor is not part of the chunk's key
            out.append(
                Chunk(
                    gates=gates[:, :, a:b].copy(),
                    guess_ids=g_ids_np[a:b].copy(),
                    guess_p=g_p_np[a:b].copy(),
                    target=tgt,
                    last_probs=probs_np[b - 1].copy(),
                    state=(h[:, b - 1 : b].clone().cpu(), c[:, b - 1 : b].clone().cpu()),
                )
            )
        return out

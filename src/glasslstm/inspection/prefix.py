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
BATCH_TOKENS = 8192  # tokens one batched pass runs at most (its gates: ~100 MB for 2 x 256)
F16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Chunk:
    """What the inspector shows about ``n`` consecutive tokens."""

    gates: dict[str, np.ndarray]  # q -> (L, n, size) float16, q in QUANTITIES
    guess_ids: np.ndarray  # (n, GUESSES) int64: the likeliest next tokens after each token
    guess_p: np.ndarray  # (n, GUESSES) float32: their probabilities
    target: np.ndarray  # (n,) float32: P(token t + 1) after token t; the last one is NaN
    last_probs: np.ndarray  # (V,) float32: the next-token distribution after the last token
    state: tuple[torch.Tensor, torch.Tensor]  # (h, c) after the last token, each (L, 1, H)

    @property
    def nbytes(self) -> int:
        arrays = (*self.gates.values(), self.guess_ids, self.guess_p, self.target, self.last_probs)
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
        sel = slice(None) if cells is None else np.asarray(cells, dtype=np.int64)
        return np.concatenate([c.gates[quantity][layer][:, sel] for c in self.chunks])

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


@dataclass
class _Job:
    """One text's tokens still to run, from ``state``; ``out`` once a pass has run them."""

    ids: np.ndarray
    state: tuple[torch.Tensor, torch.Tensor] | None
    out: list[Chunk] | None = None
    error: BaseException | None = None


class PrefixCache:
    """``run(ids) -> Run`` for ``model``, reusing the chunks of earlier texts (see the module
    docstring). Thread-safe. One forward pass at a time (``model_lock``), but texts that arrive
    while one runs are run together in the next: the thread that gets the lock runs every text
    waiting by then, as one batch (texts of similar length: at most :data:`BATCH_TOKENS`
    tokens in all), each from its own stored state. Twenty pages typing at once then cost a
    few passes, not twenty."""

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
        self._waiting: list[_Job] = []
        self.hits = self.misses = 0  # chunks reused / computed
        self.passes = 0  # forward passes run (fewer than texts when texts come together)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def waiting(self) -> int:
        """Texts waiting for the next forward pass."""
        return len(self._waiting)

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
        fresh = self._compute(_Job(arr[start:], chunks[-1].state if chunks else None))
        self._store(keys[len(chunks) :], fresh)
        return Run(list(ids), chunks + fresh)

    def _compute(self, job: _Job) -> list[Chunk]:
        """``job``'s chunks: run by this thread, with every other job waiting by the time it
        gets the model, or by the thread that got it first."""
        with self._lock:
            self._waiting.append(job)
        with self.model_lock:
            if job.out is None and job.error is None:  # nobody took it along: run them all
                with self._lock:
                    jobs, self._waiting = self._waiting, []
                for group in _groups(jobs, 2 * self.chunk):
                    try:
                        outs = self._forward(group)
                    except BaseException as e:  # each waiting request reports it
                        for j in group:
                            j.error = e
                        continue
                    for j, out in zip(group, outs):
                        j.out = out
        if job.error is not None:
            raise job.error
        assert job.out is not None
        return job.out

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
    def _forward(self, jobs: list[_Job]) -> list[list[Chunk]]:
        """One pass over the jobs' tokens as a batch (each row from its own state; shorter rows
        padded at the end, which changes nothing before the padding), cut into chunks."""
        model = self.model
        n = [len(j.ids) for j in jobs]
        B, T = len(jobs), max(n)
        x = torch.zeros(B, T, dtype=torch.long)
        for b, j in enumerate(jobs):
            x[b, : n[b]] = torch.as_tensor(j.ids)
        state = None
        if any(j.state is not None for j in jobs):
            cfg = model.config
            h0 = torch.zeros(cfg.num_layers, B, cfg.proj_size or cfg.hidden_size)
            c0 = torch.zeros(cfg.num_layers, B, cfg.hidden_size)
            for b, j in enumerate(jobs):
                if j.state is not None:
                    h0[:, b], c0[:, b] = j.state[0][:, 0], j.state[1][:, 0]
            state = (h0.to(model.device), c0.to(model.device))
        was_training = model.training
        model.eval()
        try:
            logits, _, _, trace = model(x.to(model.device), state, return_gates=True)
        finally:
            model.train(was_training)
        self.passes += 1
        probs = torch.softmax(logits.float(), -1).cpu()  # (B, T, V)
        g_p, g_ids = probs.topk(min(GUESSES, probs.shape[-1]), dim=-1)
        target = probs[:, :-1].gather(2, x[:, 1:, None])[..., 0]  # (B, T - 1)
        gates = {  # q -> (L, B, T, size)
            q: trace[q].float().clamp(-F16_MAX, F16_MAX).cpu().numpy().astype(np.float16)
            for q in QUANTITIES
        }
        h, c = trace["h"].float().cpu(), trace["c"].float().cpu()  # (L, B, T, size)
        probs_np, g_ids_np, g_p_np = probs.numpy(), g_ids.numpy(), g_p.numpy()
        target_np = target.numpy()
        out = []
        for b in range(B):
            chunks = []
            for a in range(0, n[b], self.chunk):
                e = min(a + self.chunk, n[b])
                tgt = np.full(e - a, np.nan, dtype=np.float32)
                tgt[:-1] = target_np[b, a : e - 1]  # the last: its successor is not in the key
                chunks.append(
                    Chunk(
                        gates={q: g[:, b, a:e].copy() for q, g in gates.items()},
                        guess_ids=g_ids_np[b, a:e].copy(),
                        guess_p=g_p_np[b, a:e].copy(),
                        target=tgt,
                        last_probs=probs_np[b, e - 1].copy(),
                        state=(h[:, b, e - 1 : e].clone(), c[:, b, e - 1 : e].clone()),
                    )
                )
            out.append(chunks)
        return out


def _groups(jobs: list[_Job], short: int) -> list[list[_Job]]:
    """The jobs in batches of similar length (padding at most a quarter of the longest, or any
    up to ``short`` tokens), at most BATCH_TOKENS tokens a batch, padding included."""
    groups: list[list[_Job]] = []
    for j in sorted(jobs, key=lambda j: len(j.ids)):
        g = groups[-1] if groups else None
        n = len(j.ids)
        if (
            g is not None
            and n <= max(short, 1.25 * len(g[0].ids))
            and n * (len(g) + 1) <= BATCH_TOKENS
        ):
            g.append(j)
        else:
            groups.append([j])
    return groups

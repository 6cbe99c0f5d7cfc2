"""analyze(model, text) -> Analysis: what the model computed at every token of a text."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from glasslstm.inspection.common import QUANTITIES
from glasslstm.model import LanguageModel

MAX_TOKENS = 20_000  # one forward pass; longer texts are cut (the views say so)


@dataclass
class Analysis:
    """Per token of a text: the token, every gate/state of every layer, the next-token guesses.

    ``gates[q]`` is a float32 array ``(num_layers, T, size)`` for q in i, f, g, o, c, h;
    position t holds the values after reading token t. ``top[t]`` lists the ``top_k`` most
    likely next tokens after token t as ``(text, probability)``; ``target_prob[t]`` is the
    probability the model gave to the token that actually came next (nan for the last one).
    """

    text: str
    tokens: list[str]  # each token's text (joined: the text; byte level may
    # show a split UTF-8 character as U+FFFD)
    token_ids: list[int]
    level: str  # char | word | byte
    gates: dict[str, np.ndarray]
    top: list[list[tuple[str, float]]]
    target_prob: np.ndarray  # (T,)
    truncated: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.gates["c"].shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gates["c"].shape[2]

    def __len__(self) -> int:
        return len(self.tokens)

    def values(self, quantity: str, layer: int) -> np.ndarray:
        """``(T, size)`` array of one quantity in one layer, with clear errors for bad names."""
        if quantity not in self.gates:
            raise ValueError(f"unknown quantity {quantity!r}; choose from {', '.join(QUANTITIES)}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(
                f"layer {layer} out of range: the model has {self.num_layers} "
                f"layers (0..{self.num_layers - 1})"
            )
        return self.gates[quantity][layer]

    def saturation(self, low: float = 0.1, high: float = 0.9) -> dict[str, list[dict]]:
        """Per gate (i, f, o) and layer: fraction of (step, cell) values below ``low`` and above
        ``high`` — Karpathy, Johnson & Fei-Fei (2015)'s measure of gate saturation."""
        out = {}
        for q in ("i", "f", "o"):
            out[q] = [
                {"layer": k, "left": float((a < low).mean()), "right": float((a > high).mean())}
                for k, a in enumerate(self.gates[q])
            ]
        return out

    def to_json(self, layer: int | None = None, cells: list[int] | None = None) -> dict:
        """JSON-able dict (arrays as nested lists, rounded to 4 decimals). ``gates[q]`` holds
        every layer and cell, ``(layers, T, hidden)``; with ``layer`` and ``cells``, only
        those, ``(T, len(cells))`` (a long text's whole analysis is hundreds of MB of JSON)."""
        if layer is not None and cells is not None:
            gates = {q: a[layer][:, cells] for q, a in self.gates.items()}
        else:
            gates = dict(self.gates)
        return {
            "text": self.text,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "level": self.level,
            "truncated": self.truncated,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "gates": {q: np.round(a.astype(np.float64), 4).tolist() for q, a in gates.items()},
            "top": [[[t, round(p, 4)] for t, p in row] for row in self.top],
            "target_prob": [None if np.isnan(p) else round(float(p), 4) for p in self.target_prob],
            "saturation": self.saturation(),
            "meta": self.meta,
        }


@torch.no_grad()
def analyze(
    model: LanguageModel, text: str, *, top_k: int = 3, max_tokens: int = MAX_TOKENS
) -> Analysis:
    """Run ``model`` over ``text`` once and collect what every view needs.

    Raises :class:`~glasslstm.data.DataError` (from the tokenizer) for characters outside the
    model's vocabulary and ``ValueError`` for an empty text.
    """
    tok = model.require_tokenizer()
    if not text:
        raise ValueError("the text is empty; give at least one token to look at")
    ids = tok.encode(text)
    truncated = len(ids) > max_tokens
    ids = ids[:max_tokens]
    was_training = model.training
    model.eval()
    try:
        logits, _, _, trace = model(torch.tensor([ids], device=model.device), return_gates=True)
    finally:
        model.train(was_training)
    probs = torch.softmax(logits[0].float(), -1)  # (T, V)
    k = min(top_k, probs.shape[-1])
    p_top, i_top = probs.topk(k, dim=-1)
    top = [
        [(tok.decode([i]), float(p)) for i, p in zip(ii, pp)]
        for ii, pp in zip(i_top.tolist(), p_top.tolist())
    ]
    nxt = torch.tensor(ids[1:] + [0], device=probs.device)
    target = probs.gather(1, nxt[:, None])[:, 0].cpu().numpy().astype(np.float64)
    target[-1] = np.nan
    # LanguageModel's LSTM is batch_first: each field is (L, B=1, T, size) -> (L, T, size)
    gates = {q: trace[q][:, 0].float().cpu().numpy() for q in QUANTITIES}
    if tok.level == "word":  # in context: a word's text includes the space before it
        piece = tok.decoder()
        tokens = [piece(i) for i in ids]
    else:
        tokens = [tok.decode([i]) for i in ids]
    return Analysis(
        text="".join(tokens),
        tokens=tokens,
        token_ids=list(ids),
        level=tok.level,
        gates=gates,
        top=top,
        target_prob=target,
        truncated=truncated,
    )

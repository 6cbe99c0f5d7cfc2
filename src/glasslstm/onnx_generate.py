"""Generate text from a language model exported by ``glasslstm export``, with onnxruntime and
NumPy alone: one token at a time, the LSTM state carried from step to step.

This file imports neither torch nor the rest of glasslstm. On a machine with only
``pip install onnxruntime numpy``, copy it next to the exported ``model.onnx`` and run::

    python onnx_generate.py model.onnx --prompt "ROMEO:" --length 200 --temperature 0.8

(with glasslstm installed, ``python -m glasslstm.onnx_generate ...`` is the same). From Python::

    lm = OnnxLanguageModel("model.onnx")
    print("".join(lm.generate("ROMEO:", 200, temperature=0.8, seed=1)))

The exported graph maps ``tokens`` (B, T) int64, ``h0`` and ``c0`` (layers, B, ·) to ``logits``
(B, T, V), ``h_n`` and ``c_n``. The prompt goes through it in one call (T = its length), then
every new token in a call of its own (T = 1) with the state the previous call returned. The
vocabulary and the state sizes are read from the file's metadata (``glasslstm.vocab``,
``glasslstm.config``). Sampling is glasslstm's ``LanguageModel.generate``'s: ``temperature``
(0: the argmax), ``top_k``, ``top_p``; the same prompt at temperature 0 gives the same text.
"""

from __future__ import annotations

import argparse
import codecs
import json
import re
import sys
from collections.abc import Iterator

import numpy as np

WORD_PATTERN = re.compile(r"\w+|[^\w\s]|\s+")  # glasslstm's word tokenizer's split


class OnnxLanguageModel:
    """An exported glasslstm language model run by onnxruntime (``threads``: onnxruntime's
    intra-op threads; None: its own choice)."""

    def __init__(self, path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(
                "running an ONNX model needs onnxruntime: pip install onnxruntime"
            ) from None

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime's errors are plain Exceptions (NoSuchFile, ...)
            raise ValueError(f"onnxruntime cannot load {path}: {e}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("glasslstm.kind") != "language-model" or "glasslstm.vocab" not in meta:
            raise ValueError(
                f"{path} is not a language model exported by `glasslstm export` (no vocabulary "
                "in its metadata); export one with: glasslstm export RUN --format onnx --out FILE"
            )
        config = json.loads(meta["glasslstm.config"])
        vocab = json.loads(meta["glasslstm.vocab"])
        self.level = vocab["level"]
        self.vocab_size = int(vocab["vocab_size"])
        # vocab.json's format (glasslstm's data.py): char level may reserve id 0 for unknown
        # characters; word level splits at whitespace with <eos> per line, or (format 1)
        # with a regex
        self.char_unk = self.level == "char" and bool(vocab.get("unk"))
        self.word_split = vocab.get("split", "regex")
        items = vocab.get("chars") or vocab.get("tokens")  # None for byte level
        self.items = (["\ufffd"] if self.char_unk else []) + items if items else None
        offset = 1 if self.char_unk else 0
        self.stoi = {t: i + offset for i, t in enumerate(items)} if items else {}
        layers = config["num_layers"] * config["num_directions"]
        self._state_shapes = (
            (layers, config["proj_size"] or config["hidden_size"]),
            (layers, config["hidden_size"]),
        )
        self.dtype = np.dtype(config["dtype"])

    # ---- tokens
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ValueError for characters outside a char vocabulary."""
        if self.level == "byte":
            return list(text.encode("utf-8", errors="surrogatepass"))
        if self.level == "word":
            if self.word_split == "whitespace":
                lines = text.split("\n")
                words = [w for k, line in enumerate(lines) for w in line.split() + ["<eos>"]]
                words = words[:-1]  # the last line has no newline after it
            else:
                words = WORD_PATTERN.findall(text)
            return [self.stoi.get(t, 0) for t in words]  # 0 is <unk>
        if self.char_unk:
            return [self.stoi.get(c, 0) for c in text]  # 0 is the unknown symbol
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise ValueError(
                f"the prompt has characters that are not in the vocabulary: {unknown[:20]}"
            )
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        if self.level == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        assert self.items is not None
        if self.level == "word" and self.word_split == "whitespace":
            out, line_start = [], True
            for i in ids:  # words one space apart; <eos> is a newline
                word = self.items[i]
                out.append("\n" if word == "<eos>" else word if line_start else " " + word)
                line_start = word == "<eos>"
            return "".join(out)
        return "".join(self.items[i] for i in ids)

    def start_id(self) -> int:
        """The token a prompt-less sample starts from: a newline if known, else token 0."""
        if self.level == "byte":
            return 10
        return self.stoi.get("\n", 0)

    # ---- the graph
    def initial_state(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Zeros: the state before any token."""
        (L, P), (_, H) = self._state_shapes
        return np.zeros((L, batch, P), self.dtype), np.zeros((L, batch, H), self.dtype)

    def run(self, tokens, state) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """``tokens`` (B, T) ids and the state before them -> logits (B, T, V), state after."""
        h0, c0 = state
        logits, h_n, c_n = self.session.run(
            None, {"tokens": np.asarray(tokens, dtype=np.int64), "h0": h0, "c0": c0}
        )
        return logits, (h_n, c_n)

    def generate(
        self,
        prompt: str = "",
        length: int = 200,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of ``prompt``, ``length`` tokens, piece by piece."""
        if length < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError("need length >= 0, temperature >= 0, top_k >= 0, 0 < top_p <= 1")
        rng = np.random.default_rng(seed)
        ids = self.encode(prompt) if prompt else []
        logits, state = self.run([ids or [self.start_id()]], self.initial_state())
        last = logits[0, -1]
        decoder = codecs.getincrementaldecoder("utf-8")("replace") if self.level == "byte" else None
        spaced = self.level == "word" and self.word_split == "whitespace"
        line_start = not prompt or prompt[-1].isspace()
        for _ in range(length):
            nxt = sample(last, temperature, top_k, top_p, rng)
            piece = decoder.decode(bytes([nxt])) if decoder else self.decode([nxt])
            if spaced:  # words one space apart; <eos> is a newline
                piece = piece if line_start or piece == "\n" else " " + piece
                line_start = piece == "\n"
            if piece:
                yield piece
            logits, state = self.run([[nxt]], state)
            last = logits[0, 0]
        if decoder:
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> int:
    """One token id from ``logits`` (V,): the argmax at temperature 0, else a draw from the
    softmax of ``logits / temperature`` limited to the ``top_k`` most likely tokens (0: all)
    and to the smallest set whose probability reaches ``top_p`` (1: all)."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        keep = np.cumsum(sorted_p) - sorted_p < top_p  # always keeps the most likely token
        probs = np.zeros_like(probs)
        probs[order[keep]] = sorted_p[keep]
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="onnx_generate",
        description="Generate text from a glasslstm language model exported to ONNX, with "
        "onnxruntime alone.",
    )
    p.add_argument("model", help="the .onnx file written by `glasslstm export`")
    p.add_argument("--prompt", default="", help="text to start from (default: a newline)")
    p.add_argument("--length", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: argmax (default: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold (1: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for a reproducible sample")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    args = p.parse_args(argv)
    try:
        lm = OnnxLanguageModel(args.model, threads=args.threads)
        pieces = lm.generate(
            args.prompt,
            args.length,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except BrokenPipeError:  # e.g. `... | head`
        return 0
    except (ValueError, OSError) as e:
        print(f"onnx_generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

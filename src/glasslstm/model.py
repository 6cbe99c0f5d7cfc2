"""LanguageModel: the article's application — read text, predict the next token.

Embedding -> glasslstm.LSTM (layers, dropout) -> dropout -> Linear -> softmax. The softmax over
``V H_t + b_V`` is the article's output layer; its argmax is "the" prediction (temperature 0).
The regularised LSTM family (:data:`glasslstm.config.FAMILY`) is passed to the LSTM, except
embedding dropout, which is done here.

With ``cell="rnn"`` the recurrent core is instead a vanilla RNN (:class:`glasslstm.RNN`), the
network the article says loses long-term dependencies: everything else is the same, so the two
train and evaluate with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glasslstm import __version__, options, rundir
from glasslstm.config import ModelConfig, config_from_dict  # noqa: F401  (public here too)
from glasslstm.data import Tokenizer, WordTokenizer
from glasslstm.errors import ConfigError
from glasslstm.lstm import LSTM
from glasslstm.rnn import RNN

# The recurrent core's state: (h, c) for the LSTM, (h,) for the vanilla RNN.
State = tuple[torch.Tensor, ...]
CELLS = options.CELLS


@dataclass(frozen=True)
class Prediction:
    token: str  # printable form of the token
    text: str  # the token's text
    prob: float


class LanguageModel(nn.Module):
    """Next-token model. ``tokenizer`` travels with it (saved as vocab.json)."""

    quantized: str | None = None  # "int8" once glasslstm.quantize.int8 rounded the weights

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
            raise ConfigError(
                f"tokenizer has {tokenizer.vocab_size} tokens but config.vocab_size is "
                f"{config.vocab_size}"
            )
        self.config = config
        self.tokenizer = tokenizer
        embed = config.embed_size or config.out_size
        self.embedding = nn.Embedding(config.vocab_size, embed)
        between = config.dropout if config.num_layers > 1 else 0.0
        # The recurrent core keeps the attribute name `lstm` whatever the cell: run directories
        # store its weights under it, and benchmarks swap torch's module in there.
        self.lstm: LSTM | RNN
        if config.cell == "rnn":
            self.lstm = RNN(
                embed, config.hidden_size, config.num_layers, batch_first=True, dropout=between
            )
        else:
            self.lstm = LSTM(
                embed,
                config.hidden_size,
                config.num_layers,
                batch_first=True,
                dropout=between,
                proj_size=config.proj_size,
                # the chrono initialisation sets the forget biases itself
                forget_bias=0.0 if config.chrono_init else config.forget_bias,
                checkpoint=config.checkpoint,
                chrono_init=config.chrono_init,
                layer_norm=config.layer_norm,
                peephole=config.peephole,
                cell_clip=config.cell_clip,
                zoneout_c=config.zoneout_c,
                zoneout_h=config.zoneout_h,
                recurrent_dropout=config.recurrent_dropout,
                # the embedded tokens (AWD-LSTM's dropouti); later layers read the outputs below
                input_dropout=(config.input_dropout,) + (0.0,) * (config.num_layers - 1),
                output_dropout=config.output_dropout,
                weight_dropout=config.weight_dropout,
            )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.out_size, config.vocab_size)  # V H_t + b_V
        if config.tie_weights:
            self.head.weight = self.embedding.weight

    # ------------------------------------------------------------------ the math
    def forward(
        self,
        idx: torch.Tensor,
        state: State | None = None,
        targets: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        return_gates: bool = False,
        ar: float = 0.0,
        tar: float = 0.0,
    ):
        """``idx`` (B, T) int64 -> ``(logits (B, T, V), loss or None, state)``.

        ``loss`` is the mean cross-entropy (nats per token) against ``targets`` (B, T); with
        ``weights`` (B, T), the weighted mean ``sum(w * ce) / sum(w)`` (for answer weights).
        ``state`` is the recurrent core's state after the last step, to carry into the next
        call: ``(h, c)`` for the LSTM, ``(h,)`` for the vanilla RNN.
        With ``return_gates=True`` a fourth element, the :class:`~glasslstm.GateTrace`.

        ``ar``, ``tar`` (either nonzero): a last element, the activation regularisation of
        Merity et al. (2017) as a scalar tensor, for the training objective ``loss + penalty``
        (``loss`` itself stays the cross-entropy): ``ar`` times the mean square of the top
        layer's output as the output layer reads it (after dropout), plus ``tar`` times the
        mean square of its change from one step to the next before that dropout.
        """
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(
                f"idx must be (batch, time) token ids of dtype int64; got shape "
                f"{tuple(idx.shape)} dtype {idx.dtype}"
            )
        x = self.embedding(idx)  # (B, T, E)
        p = self.config.embed_dropout
        if p and self.training:  # embedding dropout: a token type's whole row, 1/(1-p) kept
            x = x * _row_mask(self.embedding.weight, p)[idx]
        single = self.config.cell == "rnn"  # its state is h alone, not a tuple
        hx = state[0] if single and state is not None else state
        out = self.lstm(x, hx, return_gates=True) if return_gates else self.lstm(x, hx)
        h, state = out[0], ((out[1],) if single else out[1])
        dropped = self.drop(h)
        logits = self.head(dropped)  # (B, T, V)
        loss = None
        if targets is not None:
            flat, goal = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            if weights is None:
                loss = F.cross_entropy(flat, goal)
            else:
                w = weights.reshape(-1).float()
                loss = (F.cross_entropy(flat, goal, reduction="none") * w).sum() / w.sum()
        extra = (out[2],) if return_gates else ()
        if ar or tar:
            extra += (activation_penalty(h, dropped, ar, tar),)
        return (logits, loss, state, *extra)

    def stream(self, state: State | None = None):
        """A :class:`~glasslstm.stream.LMStream`: ``step(token_id) -> logits`` one token at a
        time from ``state`` (default: zeros), the fused C step on the CPU. Inference only
        (no dropout, no gradients)."""
        from glasslstm.stream import LMStream

        return LMStream(self, state)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ConfigError(
                "this model has no tokenizer (a run directory without vocab.json): build it "
                "with LanguageModel(config, tokenizer), or save it again with one"
            )
        return self.tokenizer

    def _prime(self, text: str) -> tuple[torch.Tensor, State | None]:
        """Run the prompt; return the last step's logits (V,) and the state after it."""
        tok = self.require_tokenizer()
        ids = tok.encode(text) if text else []
        if not ids:
            ids = [self.default_start_id()]
        logits, _, state = self(torch.tensor([ids], device=self.device))
        return logits[0, -1], state

    def default_start_id(self) -> int:
        """The token a prompt-less sample starts from: a newline if known, else token 0."""
        tok = self.require_tokenizer()
        try:
            ids = tok.encode("\n")
        except ValueError:
            return 0
        return ids[0] if len(ids) == 1 else 0

    # ------------------------------------------------------------------ using it
    @torch.no_grad()
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
        """Yield the continuation of ``prompt`` piece by piece (streaming), ``length`` tokens.

        ``temperature`` 0 is the article's argmax; ``top_k`` > 0 keeps the k most likely
        tokens; ``top_p`` < 1 keeps the smallest set whose probability reaches p. The LSTM
        state is carried from step to step (each step feeds one token).
        """
        _check_sampling(length, temperature, top_k, top_p)
        gen = torch.Generator(device="cpu")
        if seed is None:
            gen.seed()  # fresh entropy, for this generator only (the global RNG is untouched)
        else:
            gen.manual_seed(seed)
        tok = self.require_tokenizer()
        # Token by token: words get their spaces, a UTF-8 character split across byte
        # tokens waits for its last byte.
        decoder = tok.decoder(after=prompt)
        with self._evaluating():
            logits, state = self._prime(prompt)
            stream = self.stream(state)  # one token per step, nothing allocated
            for _ in range(length):
                nxt = _sample(logits, temperature, top_k, top_p, gen)
                piece = decoder(nxt)
                if piece:
                    yield piece
                logits = stream.step(nxt)
            tail = decoder.flush()
            if tail:
                yield tail

    @contextmanager
    def _evaluating(self):
        """Eval mode (no dropout) for the block, then back to what it was."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict_next(self, text: str, top: int = 5) -> list[Prediction]:
        """The ``top`` most likely next tokens after ``text``, with their probabilities."""
        if top < 1:
            raise ConfigError(f"top must be >= 1; got {top}")
        with self._evaluating():
            logits, _ = self._prime(text)
        probs = torch.softmax(logits.float(), -1)
        p, ids = probs.topk(min(top, probs.numel()))
        tok = self.require_tokenizer()
        return [
            Prediction(tok.token_str(i), tok.decode([i]), float(q))
            for i, q in zip(ids.tolist(), p.tolist())
        ]

    @torch.no_grad()
    def next_word(self, text: str, max_tokens: int = 30) -> tuple[str, float]:
        """The most likely next word after ``text``, found greedily token by token, and its
        probability (the product of the chosen tokens' probabilities, spaces included)."""
        tok = self.require_tokenizer()
        word, prob, stream = "", 1.0, None
        with self._evaluating():
            logits, state = self._prime(text)
            if isinstance(tok, WordTokenizer) and tok.split != "regex":
                probs = torch.softmax(logits.float(), -1)  # one token is one word
                probs[tok.stoi[tok.EOS]] = 0.0  # the end of the line is not a word
                if tok.split == "words":  # nor is a punctuation mark
                    probs[[i for i, t in enumerate(tok.tokens) if not t[:1].isalnum()]] = 0.0
                i = int(probs.argmax())
                return tok.decode([i]), float(probs[i])
            for _ in range(max_tokens):
                probs = torch.softmax(logits.float(), -1)
                i = int(probs.argmax())
                piece = tok.decode([i])
                if word and not (piece.isalnum() or piece in "'-"):
                    break  # the word ended
                if not word and not piece.isspace() and not piece.isalnum():
                    break  # punctuation instead of a word
                prob *= float(probs[i])
                word += piece.strip()
                if word and tok.level == "word":
                    break  # one token is one word
                if stream is None:
                    stream = self.stream(state)
                logits = stream.step(i)
        return word, prob

    @torch.no_grad()
    def continuation_prob(self, text: str, continuation: str) -> float:
        """P(continuation | text): the product of the model's probabilities of its tokens."""
        tok = self.require_tokenizer()
        ids = tok.encode(text) or [self.default_start_id()]
        cont = tok.encode(continuation)
        if not cont:
            return 1.0
        with self._evaluating():
            logits, _, _ = self(torch.tensor([ids + cont[:-1]], device=self.device))
        logp = torch.log_softmax(logits[0, len(ids) - 1 :].float(), -1)
        return math.exp(
            float(logp.gather(1, torch.tensor(cont, device=self.device)[:, None]).sum())
        )

    # ------------------------------------------------------------------ files
    def save(self, run_dir, *, metadata: dict[str, str] | None = None) -> Path:
        """Write the model as a run directory that :meth:`load` and every command taking a
        RUN (``glasslstm sample RUN``, ``predict``, ``inspect``, ``export``, ...) read back;
        returns its path. Format: docs/run-directory.md.

        Writes ``config.json`` (the model config), ``vocab.json`` (the tokenizer, when the
        model has one) and ``model.safetensors`` (the weights; ``metadata``: strings stored in
        its header), each atomically. ``run_dir`` may be new, empty, or one an earlier
        ``save`` wrote (it is replaced). A training run's directory is refused: its train state
        and checkpoints belong to it. For the weights alone: :meth:`save_weights`.
        """
        run_dir = Path(run_dir)
        if run_dir.suffix == ".safetensors":
            raise ConfigError(
                f"save() writes a run directory, and {run_dir} names a .safetensors file: pass "
                "a directory, or use save_weights(path) for the weights alone"
            )
        _check_save_target(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.save_weights(run_dir / "model.safetensors", metadata=metadata)
        vocab = run_dir / "vocab.json"
        if self.tokenizer is not None:
            rundir.atomic_write_json(vocab, self.tokenizer.to_dict())
        else:
            vocab.unlink(missing_ok=True)  # an earlier save's tokenizer is not this model's
        # last: a directory without config.json is not loadable, so a crash before this line
        # never leaves a fresh directory that loads with half of its files
        rundir.write_config(
            run_dir, {"glasslstm_version": __version__, "model": self.config_dict()}
        )
        return run_dir

    def save_weights(self, path, *, metadata: dict[str, str] | None = None) -> None:
        """Write the weights alone (the state_dict) to the safetensors file ``path``,
        atomically; ``metadata``: strings stored in the file's header."""
        rundir.save_tensors(path, self.state_dict(), metadata)

    @classmethod
    def load(
        cls, run_dir, *, which: str = "best", device: str | torch.device = "cpu"
    ) -> LanguageModel:
        """Load a model from a run directory: one written by ``glasslstm train`` or by
        :meth:`save`.

        ``which``: ``"best"`` (lowest validation loss, if saved; else the last) or ``"last"``.
        Config and vocabulary are JSON, weights safetensors: nothing in the files is executed.
        Without a ``vocab.json`` the model has no tokenizer (it was saved without one).
        """
        if which not in ("best", "last"):
            raise ConfigError(f"which must be 'best' or 'last'; got {which!r}")
        from glasslstm import runfiles

        device = options.resolve_device(device)
        files = runfiles.read_model(run_dir, which, device)  # each file checked before use
        model = cls(files.config, files.tokenizer)
        model.load_state_dict(files.weights, strict=not files.config.tie_weights)
        model.eval()
        return model.to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict:
        return asdict(self.config)


def activation_penalty(h: torch.Tensor, dropped: torch.Tensor, ar: float, tar: float):
    """AR + TAR (Merity et al. 2017) of a top layer's output ``h`` (B, T, H) and ``dropped``, the
    same after dropout: ``ar * mean(dropped^2) + tar * mean((h_t - h_{t-1})^2)``, in float32
    (a window of one step has no change: its TAR is 0)."""
    penalty = h.new_zeros((), dtype=torch.float32)
    if ar:
        penalty = penalty + ar * dropped.float().pow(2).mean()
    if tar and h.shape[1] > 1:
        penalty = penalty + tar * (h[:, 1:] - h[:, :-1]).float().pow(2).mean()
    return penalty


def _row_mask(weight: torch.Tensor, p: float) -> torch.Tensor:
    """(V, 1): 0 with probability p, else 1/(1-p) — one draw per row (token type) of
    ``weight``, the embedding dropout of Gal & Ghahramani (2016) and Merity et al. (2017)."""
    return weight.new_empty(weight.shape[0], 1).uniform_().ge_(p).div_(1.0 - p)


def _check_save_target(run_dir: Path) -> None:
    """Refuse a place where :meth:`LanguageModel.save` would overwrite what is not its own."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file; save() writes a run directory: pass a directory")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not (run_dir / rundir.CONFIG_FILE).is_file():
        raise ConfigError(
            f"{run_dir} is not empty and is not a glasslstm run directory; save to a new or "
            "empty directory"
        )
    cfg = rundir.read_config(run_dir)
    if "train" in cfg or (run_dir / rundir.TRAIN_STATE_TENSORS).exists():
        raise ConfigError(
            f"{run_dir} holds a training run (its train state and checkpoints belong to it); "
            "save to another directory"
        )


def training_data(run_dir, *, required: bool = True) -> tuple[str | None, str | None]:
    """``(data, data_dir)`` a run was trained on (as given to ``glasslstm train``), for the
    commands that default to its validation split. A directory written by
    :meth:`LanguageModel.save` records none: ``(None, None)``, or a RunDirError when
    ``required``."""
    train = rundir.read_config(run_dir).get("train")
    if not isinstance(train, dict):
        if not required:
            return None, None
        raise rundir.RunDirError(
            f"{run_dir} records no training data (a model saved with LanguageModel.save): "
            "pass --data FILE to say what text to use"
        )
    return train.get("data"), train.get("data_dir")


def training_splits(run_dir) -> dict[str, str | None]:
    """The split files a run was trained with (``--train``, ``--valid``, ``--test``; each
    None where not given), for the commands that read its validation or test split."""
    train = rundir.read_config(run_dir).get("train")
    train = train if isinstance(train, dict) else {}
    return {split: train.get(split) for split in ("train", "valid", "test")}


def load_vocab(run_dir) -> Tokenizer:
    """The tokenizer saved in ``run_dir/vocab.json`` (JSON; a clear RunDirError if unusable)."""
    from glasslstm import runfiles

    return runfiles.read_vocab(run_dir)


def _check_sampling(length: int, temperature: float, top_k: int, top_p: float) -> None:
    values = {"length": length, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    options.check(values, options.SAMPLING, name=str)


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator
) -> int:
    """One token id from ``logits`` (V,)."""
    logits = logits.float().cpu()
    if temperature == 0:
        return int(logits.argmax())
    logits = (logits - logits.max()) / temperature  # the max at 0: no overflow at any T > 0
    if top_k and top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))

"""Word-level language modelling on a WikiText-style split, side by side with a peer.

Builds a train/valid/test split from one WikiText file (by default WikiText-2's validation
file, which a user can download with the dataset) and trains glasslstm's word-level defaults
on it, optionally side by side with pytorch/examples' ``word_language_model`` at its defaults
(2 x 200 LSTM, SGD lr 20, bptt 35, batch 20), each pinned to its own core with one thread.

The split: the file's articles (a line `` = Title = ``) are kept whole; the first article
starting at or after 80% of the lines begins the validation split, the first at or after 90%
the test split. Words of the validation and test splits that the training split never uses
become ``<unk>``, as in the published WikiText and PTB files, so both contenders see the same
vocabulary (the training split's).

Equal wall time: both start together; when glasslstm's process ends (its ``--time-budget`` of
training, its validations and its test scoring), the peer is sent SIGINT, which its script
handles by scoring its best saved model on the test split. Bits per character are the test
loss in nats per word times the split's words (whitespace-separated, plus one end-of-line
token per line) over its characters, divided by ln 2; the same formula for both.

    python -m glasslstm.bench.wikitext --source DIR/wikitext-2/valid.txt --minutes 10 \\
        --peer DIR/examples/word_language_model

Writes ``--out`` (default runs/bench-wikitext/): the split under data/, glasslstm's run
directory, both logs and results.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ARTICLE = re.compile(r"^ = [^=].* = $")  # a level-1 heading: `` = Title = ``


def article_starts(lines: list[str]) -> list[int]:
    """Indices of the lines that begin an article."""
    return [i for i, line in enumerate(lines) if ARTICLE.match(line.rstrip("\n"))]


def split_articles(text: str, fractions=(0.8, 0.9)) -> tuple[str, str, str]:
    """(train, valid, test): whole articles, cut at the first article start at or after each
    fraction of the lines. Raises ValueError when the text has too few articles."""
    lines = text.splitlines(keepends=True)
    starts = article_starts(lines)
    cuts: list[int] = []
    for frac in fractions:
        after = [s for s in starts if s >= frac * len(lines) and (not cuts or s > cuts[-1])]
        if not after:
            raise ValueError(
                f"the text has {len(starts)} article headings (lines ' = Title = '); "
                "a split needs one after 80% and one after 90% of the lines"
            )
        cuts.append(after[0])
    a, b = cuts
    return "".join(lines[:a]), "".join(lines[a:b]), "".join(lines[b:])


def words(text: str) -> list[str]:
    """The word-level tokens of the literature: whitespace-separated words, one end of line."""
    out: list[str] = []
    for line in text.splitlines():
        out += line.split() + ["<eos>"]
    return out


def replace_unknown(text: str, vocab: set[str]) -> tuple[str, int]:
    """``text`` with every word outside ``vocab`` written ``<unk>``; and how many were."""
    n = 0
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        parts = []
        for w in body.split(" "):
            if w and w not in vocab:
                parts.append("<unk>")
                n += 1
            else:
                parts.append(w)
        lines.append(" ".join(parts) + line[len(body) :])
    return "".join(lines), n


def make_split(source: Path, out: Path) -> dict:
    """Writes out/{train,valid,test}.txt; returns their sizes."""
    train, valid, test = split_articles(source.read_text(encoding="utf-8"))
    vocab = set(train.split())
    valid, unk_valid = replace_unknown(valid, vocab)
    test, unk_test = replace_unknown(test, vocab)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, object] = {}
    for name, text, unk in (
        ("train", train, 0),
        ("valid", valid, unk_valid),
        ("test", test, unk_test),
    ):
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        sizes[name] = {
            "lines": text.count("\n"),
            "words": len(words(text)),
            "chars": len(text),
            "replaced_by_unk": unk,
        }
    sizes["vocabulary"] = len(vocab | {"<eos>"})
    return sizes


def bpc(loss: float, n_words: int, n_chars: int) -> float:
    """Bits per character from a loss in nats per word over a text."""
    return loss * n_words / n_chars / math.log(2)


PEER_TEST = re.compile(r"End of training \| test loss\s+([\d.]+) \| test ppl\s+([\d.]+)")
PEER_EPOCH = re.compile(r"end of epoch\s+(\d+) \| time:\s+([\d.]+)s \| valid loss\s+([\d.]+)")


def parse_peer(log: str) -> dict:
    """The peer's test perplexity (its loss is printed with two decimals; ppl with two, so
    the loss is taken as ln ppl) and its finished epochs."""
    epochs = [
        {"epoch": int(e), "seconds": float(s), "valid_loss": float(v)}
        for e, s, v in PEER_EPOCH.findall(log)
    ]
    m = PEER_TEST.search(log)
    if not m:
        why = "see peer.log" if epochs else "it finished no epoch; give more --minutes"
        raise SystemExit(f"the peer printed no test result: {why}")
    ppl = float(m.group(2))
    return {"loss": math.log(ppl), "perplexity": ppl, "epochs": epochs}


def _start_on(core: int) -> None:
    """In the child before exec: pin to ``core``, and take SIGINT's default action back (a
    shell that starts a job in the background has it ignored, and Python would then never
    raise KeyboardInterrupt, which is how the peer is told to stop and score its model)."""
    os.sched_setaffinity(0, {core})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pinned(core: int):
    return functools.partial(_start_on, core)


def run(args) -> dict:
    out = Path(args.out)
    data = out / "data"
    sizes = make_split(Path(args.source), data)
    print(f"split of {args.source}:")
    for name in ("train", "valid", "test"):
        s = sizes[name]
        print(
            f"  {name:5s} {s['lines']:6,d} lines {s['words']:8,d} words {s['chars']:10,d} chars"
            f"  ({s['replaced_by_unk']:,d} words -> <unk>)"
        )
    cores = sorted(os.sched_getaffinity(0))
    if args.peer and len(cores) < 2:
        raise SystemExit("side by side needs two cores; this process has one")
    budget = args.minutes * 60
    ours_cmd = [
        sys.executable, "-m", "glasslstm", "train", "--level", "word",
        "--train", str(data / "train.txt"), "--valid", str(data / "valid.txt"),
        "--test", str(data / "test.txt"), "--time-budget", str(budget),
        "--threads", "1", "--out", str(out / "glasslstm"), "--json", *args.extra,
    ]  # fmt: skip
    env1 = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(out / "glasslstm.log", "w") as ours_log:
        ours = subprocess.Popen(
            ours_cmd, stdout=subprocess.PIPE, stderr=ours_log, text=True, env=env1,
            preexec_fn=pinned(cores[0]),
        )  # fmt: skip
        peer = peer_log = None
        if args.peer:
            peer_dir = Path(args.peer).resolve()
            peer_cmd = [
                sys.executable, str(peer_dir / "main.py"), "--data", str(data.resolve()),
                "--epochs", "1000", "--save", str((out / "peer-model.pt").resolve()),
            ]  # fmt: skip
            peer_log = open(out / "peer.log", "w")
            peer = subprocess.Popen(
                peer_cmd, stdout=peer_log, stderr=subprocess.STDOUT, text=True, env=env1,
                cwd=peer_dir, preexec_fn=pinned(cores[1]),
            )  # fmt: skip
        stdout, _ = ours.communicate()
        ours_wall = time.perf_counter() - t0
        if ours.returncode != 0:
            if peer:
                peer.kill()
            raise SystemExit(f"glasslstm train failed; see {out / 'glasslstm.log'}")
        result = json.loads(stdout)
        peer_res = None
        if peer:
            peer.send_signal(signal.SIGINT)  # the peer scores its best model on the test split
            try:
                peer.wait(timeout=600)
            except subprocess.TimeoutExpired:
                peer.kill()
                raise SystemExit("the peer did not stop within 10 minutes of SIGINT") from None
            if peer_log is not None:
                peer_log.close()
            peer_res = parse_peer((out / "peer.log").read_text())
            peer_res["wall_seconds_when_stopped"] = ours_wall
    test = sizes["test"]
    ours_res = {
        "loss": result["test"]["loss"],
        "perplexity": result["test"]["perplexity"],
        "tokens": result["test"]["tokens"],
        "bpc_reported": result["test"]["bpc"],
        "steps": result["step"],
        "wall_seconds": ours_wall,
    }
    summary = {"split": sizes, "minutes": args.minutes, "glasslstm": ours_res, "peer": peer_res}
    for res in (ours_res, peer_res):
        if res:
            res["bpc"] = bpc(res["loss"], test["words"], test["chars"])
    return summary


def main() -> None:
    p = argparse.ArgumentParser(
        description="Word-level LM on a WikiText-style split, optionally side by side with "
        "pytorch/examples' word_language_model.",
        epilog="Anything after -- is passed to glasslstm train (e.g. -- --ar 2 --tar 1).",
    )
    p.add_argument("--source", required=True, help="a WikiText file to split (e.g. valid.txt)")
    p.add_argument("--minutes", type=float, default=10.0, help="glasslstm's training time")
    p.add_argument(
        "--peer",
        default=None,
        help="folder of pytorch/examples' word_language_model (main.py, model.py, data.py); "
        "without it, only glasslstm runs",
    )
    p.add_argument("--out", default="runs/bench-wikitext", help="where the split, runs and logs go")
    p.add_argument("extra", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    import torch

    from glasslstm.bench.timing import command_line, machine_info

    info = machine_info(torch.device("cpu"))
    print(command_line())
    print(info)
    summary = run(args)
    summary.update({"command": command_line(), "machine": info})
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print("\ntest split, same formula for both (nats/word x words / chars / ln 2):")
    for name in ("glasslstm", "peer"):
        r = summary[name]
        if r:
            print(f"  {name:9s} perplexity {r['perplexity']:8.1f}   {r['bpc']:.3f} bits/char")
    if summary["peer"]:
        peer = summary["peer"]
        done, at = len(peer["epochs"]), peer["wall_seconds_when_stopped"]
        print(f"  peer: {done} epochs finished when stopped at {at:.0f} s")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()

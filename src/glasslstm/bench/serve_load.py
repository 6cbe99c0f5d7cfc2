"""The web inspector under load: concurrent clients sending what the page sends.

Starts ``glasslstm serve RUN`` on 127.0.0.1 (a free port) in a child process, then runs
``--clients`` threads in this one. Each client is a page: it loads ``/api/info`` once, then
sends ``--requests`` analysis requests (``POST /api/analyze``, the body the page sends: the
whole text, the layer, the quantity, the heatmap's cells, ``top_k``), each after the answer to
the previous one (no pause: a closed loop, the hardest a person typing can push it). Every
client has its own text: a different ``--chars``-character passage of the run's validation
split, so the clients share no work. Two ways of changing it from one request to the next:

- ``typing``: someone typing the end of the passage: the first request holds all but the last
  ``--requests - 1`` characters, each later one one character more (the page sends the whole
  text after each pause), ending at ``--chars`` characters;
- ``cold``: every request a passage never sent before (the start moves on each time), so the
  server's prefix cache cannot help: the cost of a first look at a text.

Reported per mode: requests, errors (anything but a 200 with a complete analysis), the median,
90th percentile and largest time from sending a request to having read its whole answer, the
requests answered per second, the size of the answers, and the CPU time per request of the
server process and of the clients (this process: sending, reading, parsing the JSON). On a
shared machine the times depend on what else runs; the CPU times much less: 2 cores over their
sum is about what a quiet 2-core machine answers per second. Bounded: ``--requests`` per
client and ``--time-limit`` seconds per mode (no new request starts after it).

    python -m glasslstm.bench.serve_load RUN                        # 20 clients x 20, both modes
    python -m glasslstm.bench.serve_load RUN --modes typing --clients 5 --requests 5
    python -m glasslstm.bench.serve_load RUN --json serve_load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from glasslstm.bench.timing import cpu_model

MODES = ("typing", "cold")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


class Server:
    """``glasslstm serve RUN --port 0`` in a child process, started by the constructor (which
    returns once it prints its address). Its output is read to the end in a thread (a full pipe
    would stop it); its error output goes to a temporary file, shown if it does not start."""

    def __init__(self, run_dir: str, extra: list[str], timeout: float = 300.0):
        cmd = [sys.executable, "-m", "glasslstm", "serve", run_dir, "--port", "0", *extra]
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, text=True)
        ready, found = threading.Event(), {}

        def read():
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
                if m and not ready.is_set():
                    found["port"] = int(m.group(1))
                    ready.set()
            ready.set()  # the output ended without an address

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout)
        if "port" not in found:
            raise SystemExit(f"the server did not start within {timeout:.0f} s: {self.stop()}")
        self.port: int = found["port"]

    def stop(self) -> str:
        """Stop the server; return what it wrote to its error output."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.seek(0)
        text = self._err.read().strip()
        self._err.close()
        return text


def passages(run_dir: str, n: int, chars: int, extra: int) -> list[str]:
    """``n`` passages of ``chars + extra`` characters of the run's validation split that the
    model's vocabulary can spell, spread over the split (no two overlap where it is long
    enough)."""
    from glasslstm.data import load_corpus
    from glasslstm.model import load_vocab
    from glasslstm.rundir import read_config

    train = read_config(run_dir)["train"]
    text = load_corpus(train.get("data"), data_dir=train.get("data_dir")).val.decode("utf-8")
    tok = load_vocab(run_dir)
    size = chars + extra
    if len(text) < size:
        raise SystemExit(f"the validation split has {len(text):,} characters; need {size:,}")
    step = max(1, (len(text) - size) // max(1, n * 4))
    out = []
    for start in range(0, len(text) - size + 1, step):
        piece = text[start : start + size]
        try:
            tok.encode(piece)
        except ValueError:
            continue
        out.append(piece)
        if len(out) == n:
            return out
    raise SystemExit(f"found only {len(out)} passages the vocabulary can spell; need {n}")


def client(port: int, texts: list[str], deadline: float, out: list, body_extra: dict) -> None:
    """One page: /api/info, then each text in turn, each after the previous answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", "/api/info")
        info = json.loads(conn.getresponse().read())
        layer = info["num_layers"] - 1  # the page opens on the last layer
        cells = [c["cell"] for c in info["informative"]["layers"][layer]]
        for text in texts:
            if time.perf_counter() > deadline:
                break
            body = json.dumps({"text": text, "layer": layer, "cells": cells, **body_extra})
            t0 = time.perf_counter()
            try:
                conn.request(
                    "POST", "/api/analyze", body.encode(), {"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                raw = resp.read()
                dt = time.perf_counter() - t0
                ok = resp.status == 200 and "values" in json.loads(raw)
                out.append({"seconds": dt, "bytes": len(raw), "ok": ok, "status": resp.status})
            except (OSError, http.client.HTTPException, ValueError) as e:
                out.append(
                    {
                        "seconds": time.perf_counter() - t0,
                        "bytes": 0,
                        "ok": False,
                        "status": type(e).__name__,
                    }
                )
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_mode(mode, server: Server, pieces, args) -> dict:
    chars, n = args.chars, args.requests
    if mode == "typing":  # one character more each time, ending at `chars`
        texts = [[p[: chars - n + 1 + k] for k in range(n)] for p in pieces]
    else:  # a new passage every time: the start moves on by `shift` characters
        shift = max(1, (len(pieces[0]) - chars) // max(1, n - 1))
        texts = [[p[k * shift : k * shift + chars] for k in range(n)] for p in pieces]
    results: list[dict] = []
    deadline = time.perf_counter() + args.time_limit
    body = {"quantity": "h", "top_k": 10}
    pid, port = server.proc.pid, server.port
    threads = [
        threading.Thread(target=client, args=(port, t, deadline, results, body)) for t in texts
    ]
    t0, server0, client0 = time.perf_counter(), cpu_seconds(pid), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_seconds(pid) - server0, time.process_time() - client0
    secs = [r["seconds"] for r in results]
    sizes = [r["bytes"] for r in results if r["ok"]]
    errors = [r["status"] for r in results if not r["ok"]]
    return {
        "mode": mode,
        "clients": len(pieces),
        "requests": len(results),
        "errors": len(errors),
        "error_kinds": sorted(set(map(str, errors))),
        "median_s": round(statistics.median(secs), 4) if secs else None,
        "p90_s": round(_percentile(secs, 90), 4) if secs else None,
        "max_s": round(max(secs), 4) if secs else None,
        "requests_per_s": round(len(results) / wall, 2),
        "wall_s": round(wall, 2),
        "server_cpu_ms_per_request": round(1000 * server_cpu / max(1, len(results)), 1),
        "client_cpu_ms_per_request": round(1000 * client_cpu / max(1, len(results)), 1),
        "response_bytes_median": int(statistics.median(sizes)) if sizes else None,
        "response_bytes_max": max(sizes) if sizes else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--clients", type=int, default=20, help="concurrent pages (default: 20)")
    p.add_argument("--chars", type=int, default=2000, help="characters a text (default: 2000)")
    p.add_argument("--requests", type=int, default=20, help="requests a client (default: 20)")
    p.add_argument("--time-limit", type=float, default=300, help="seconds a mode, at most")
    p.add_argument("--modes", default=",".join(MODES), help="typing,cold (default: both)")
    p.add_argument("--json", metavar="OUT", help="also write the figures here")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes) or not modes:
        p.error(f"--modes takes {', '.join(MODES)}; got {args.modes!r}")
    if min(args.clients, args.chars, args.requests) < 1 or args.requests > args.chars:
        p.error("--clients, --chars, --requests must be >= 1 (and --requests <= --chars)")
    extra = args.chars * 2  # room for the cold mode's moving start
    pieces = passages(args.run_dir, args.clients, args.chars, extra)
    info = {
        "command": "python -m glasslstm.bench.serve_load "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "run": str(Path(args.run_dir)),
    }
    for k, v in info.items():
        print(f"{k}: {v}")
    server = Server(args.run_dir, ["--max-chars", str(args.chars)])
    try:
        results = [run_mode(m, server, pieces, args) for m in modes]
    finally:
        server.stop()
    print(
        f"\n{'mode':<7} {'clients':>7} {'requests':>8} {'errors':>6} {'median s':>9} "
        f"{'p90 s':>7} {'max s':>7} {'req/s':>6} {'answer KB':>9} {'server CPU ms':>13} "
        f"{'client CPU ms':>13}"
    )
    for r in results:
        kb = (r["response_bytes_max"] or 0) / 1024
        print(
            f"{r['mode']:<7} {r['clients']:>7} {r['requests']:>8} {r['errors']:>6} "
            f"{r['median_s']:>9} {r['p90_s']:>7} {r['max_s']:>7} {r['requests_per_s']:>6} "
            f"{kb:>9.0f} {r['server_cpu_ms_per_request']:>13} "
            f"{r['client_cpu_ms_per_request']:>13}"
        )
    print(f"loadavg_1m_at_end: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

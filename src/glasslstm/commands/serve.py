"""glasslstm serve: the web inspector (type text, watch predictions and gates) on this machine."""

from __future__ import annotations

import ipaddress
import socket
import sys

from glasslstm.commands import common
from glasslstm.errors import ConfigError, DataError

DEFAULT_HOST = "127.0.0.1"  # this machine only; another address only when asked for by --host
WILDCARDS = ("0.0.0.0", "::", "")  # every interface of this machine


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web app: type text, watch predictions and gates",
        description="Serve the web inspector for a trained model: it opens on an example "
        "(the article's passage for a stories model) with the most informative cells shown; "
        "type text and watch the next-token distribution and the gates update; select a span "
        "to list the cells that stay on across it, and search the validation text for other "
        "spans where they do (LSTMVis's match view).",
    )
    common.add_run_dir(p)
    p.add_argument(
        "--port", type=int, default=8000, help="TCP port (default: 8000; 0: any free one)"
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default: {DEFAULT_HOST}, this machine only). Another "
        "address exposes the inspector, without a password, to whoever can reach it",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name the inspector may be reached under (the Host of a request: a "
        "DNS name or address, without the port); repeatable. Loopback names, the --host "
        "address and, for 0.0.0.0, this machine's own names are always allowed",
    )
    p.add_argument(
        "--max-chars", type=int, default=2000, help="longest text the page accepts (default: 2000)"
    )
    p.add_argument(
        "--cache-mb",
        type=float,
        default=512,
        help="memory for the forward passes of recent texts, so that typing into a long text "
        "recomputes only its end (MiB; default: 512, ~20 texts of 2,000 characters for a "
        "2 x 256 model; 0: off)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for each forward pass (default: 1). One pass runs at a time; the "
        "passes of typing are short, and on a machine where anything else runs, more threads "
        "wait for each other (measured: 3-6x slower with 2 on 2 busy cores)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="text the match view searches: a text file (whole), or a corpus name "
        "(its validation split); default: the run's own validation split",
    )
    p.add_argument("--data-dir", default=None, help="where named corpora are looked up")
    common.add_which(p)
    common.add_quantize(p)
    p.set_defaults(run=run)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; ConfigError (one clear line) when that fails."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535; got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise ConfigError(
            f"cannot listen on {host!r}: {getattr(e, 'strerror', None) or e}"
        ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; pick another "
            "--port (or --port 0 for any free one)"
        ) from None
    return sock


def _host_name(host: str) -> str:
    """``host`` as it appears in a Host header: IPv6 addresses in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def allowed_hosts(host: str, extra=()) -> list[str]:
    """The Host names the inspector answers to: loopback names, ``host`` (for a wildcard
    address, this machine's name, full name and addresses), and ``extra``."""
    from glasslstm.inspection.server import LOOPBACK_HOSTS

    names = list(LOOPBACK_HOSTS)
    if host in WILDCARDS:
        own = {socket.gethostname(), socket.getfqdn()}
        try:
            own |= {str(a[4][0]) for a in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
        names += sorted(own)
    else:
        names.append(host)
    names += list(extra)
    return list(dict.fromkeys(_host_name(n.strip().lower()) for n in names if n.strip()))


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    import uvicorn

    from glasslstm.inspection.server import create_app

    if args.max_chars < 1:
        raise ConfigError(f"--max-chars must be >= 1; got {args.max_chars}")
    if not args.cache_mb >= 0:
        raise ConfigError(f"--cache-mb must be >= 0 (0: no cache); got {args.cache_mb}")
    if not 1 <= args.threads <= 1024:
        raise ConfigError(f"--threads must be in 1..1024; got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    hosts = allowed_hosts(args.host, args.allow_host)
    app = create_app(
        args.run_dir,
        max_chars=args.max_chars,
        data=args.data,
        data_dir=args.data_dir,
        cache_mb=args.cache_mb,
        which=args.which,
        quantize=args.quantize,
        allowed_hosts=hosts,
    )
    sock = listen(args.host, args.port)
    try:
        host, port = sock.getsockname()[:2]
        insp = app.state.inspector
        insp.warm()  # the page's first load answers at once; a broken match text shows now
        if insp.match_error:
            if args.data is not None:
                raise DataError(f"--data {args.data}: {insp.match_error}")
            print(f"glasslstm serve: warning: {insp.match_error}", file=sys.stderr, flush=True)
        if not is_loopback(host):
            where = "every network interface" if args.host in WILDCARDS else host
            print(
                f"glasslstm serve: warning: listening on {where}, beyond this machine: anyone "
                f"who can reach port {port} can read what is typed into the inspector and make "
                "the model compute; there is no password and the traffic is plain HTTP. It "
                f"answers to the names {', '.join(hosts)} (add more with --allow-host). Leave "
                "out --host to keep it on 127.0.0.1.",
                file=sys.stderr,
                flush=True,
            )
        if args.host in WILDCARDS:  # reachable from here under the loopback name
            host = "::1" if ":" in host else "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        print(
            f"glasslstm serve: the inspector for {args.run_dir} is at http://{shown}:{port}/ "
            "(Ctrl+C stops it)",
            flush=True,
        )
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0

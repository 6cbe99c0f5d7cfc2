"""glasslstm serve: the web inspector (type text, watch predictions and gates) on this machine."""

from __future__ import annotations

import socket

from glasslstm.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"  # this machine only; another address only when asked for by --host


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web app: type text, watch predictions and gates",
        description="Serve the web inspector for a trained model: type text and "
        "watch the next-token distribution and the gates update; select a span "
        "to list the cells that stay on across it, and search the validation "
        "text for other spans where they do (LSTMVis's match view).",
    )
    p.add_argument(
        "run_dir",
        metavar="RUN",
        help="a run directory (from `glasslstm train` or LanguageModel.save)",
    )
    p.add_argument(
        "--port", type=int, default=8000, help="TCP port (default: 8000; 0: any free one)"
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; "
        "0.0.0.0 exposes the inspector to your network)",
    )
    p.add_argument(
        "--max-chars", type=int, default=2000, help="longest text the page accepts (default: 2000)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="text the match view searches: a text file (whole), or a corpus name "
        "(its validation split); default: the run's own validation split",
    )
    p.add_argument("--data-dir", default=None, help="where named corpora are looked up")
    p.add_argument("--which", choices=("best", "last"), default="best", help="which saved model")
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


def run(args) -> int:
    import uvicorn

    from glasslstm.inspection.server import create_app

    if args.max_chars < 1:
        raise ConfigError(f"--max-chars must be >= 1; got {args.max_chars}")
    app = create_app(
        args.run_dir,
        max_chars=args.max_chars,
        data=args.data,
        data_dir=args.data_dir,
        which=args.which,
    )
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"glasslstm serve: the inspector for {args.run_dir} is at http://{shown}:{port}/ "
        "(Ctrl+C stops it)",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0

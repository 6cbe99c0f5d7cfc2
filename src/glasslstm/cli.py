"""The `glasslstm` command: parse arguments, call the library, print. ``main(argv) -> int``.

One small module per subcommand in :mod:`glasslstm.commands`; each has ``add_parser(sub)``
and ``run(args) -> int``, and checks its options (:mod:`glasslstm.options`) before any work.
Problems with the user's input (data, run directories, options) are printed as one clear line
with exit status 2, a failed write with 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from glasslstm import __version__
from glasslstm.commands import (
    bench,
    cells,
    demo,
    evaluate,
    export,
    inspect,
    predict,
    sample,
    serve,
    train,
)
from glasslstm.errors import USER_ERRORS

COMMANDS = (train, sample, predict, evaluate, export, bench, demo, inspect, cells, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glasslstm",
        description="The LSTM from first principles: train, sample, predict, and look inside.",
    )
    parser.add_argument("--version", action="version", version=f"glasslstm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"glasslstm {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"glasslstm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `glasslstm sample ... | head`
        return 0


def console(argv: list[str] | None = None) -> NoReturn:
    """The ``glasslstm`` program: :func:`main`, then exit with its status."""
    status = main(argv)
    # A process can only have joined a process group through glasslstm.distributed, which
    # ends such a process in its own way (see finish); without it, nothing was joined.
    group = sys.modules.get("glasslstm.distributed")
    if group is not None:
        group.finish(status)
    sys.exit(status)


if __name__ == "__main__":  # python -m glasslstm.cli
    console()

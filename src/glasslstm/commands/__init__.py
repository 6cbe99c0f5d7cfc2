"""One module per `glasslstm` subcommand: ``add_parser(subparsers)`` and ``run(args) -> int``."""

"""One module per `duquant` subcommand; each defines register(subparsers) and a run(args) -> int."""

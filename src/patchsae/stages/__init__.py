"""One module per CLI stage. Each defines NAME, HELP, OPTIONS (the option dataclasses its subcommand takes),
RUN_HELP if it takes `--run`, `run(run, options) -> typed report`, and `cli(args)` that the command line calls.
Stages are the only code that writes into a run directory; nothing below `stages/` imports from it."""

"""One source for every option: a stage's options are a frozen dataclass whose fields carry their help text.

`opt(default, "help", flag="--top-k")` is a dataclass field with CLI metadata; `cli.py` builds each subcommand's
parser from these fields (names, types, defaults, help), so nothing about an option is written twice. Metadata:
  help      the help line (the default is appended unless `show_default=False`)
  flag      the command-line name when it differs from `--field-name`
  metavar   argparse's metavar; choices: allowed values; required: must be given
  cli       False keeps a field off the command line (set by code, e.g. the k grid of a study)
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def opt(default: Any = MISSING, help: str = "", *, flag: str | None = None, metavar: str | None = None,
        choices: tuple | None = None, required: bool = False, cli: bool = True, show_default: bool = True) -> Any:
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices, "required": required, "cli": cli,
            "show_default": show_default}
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)

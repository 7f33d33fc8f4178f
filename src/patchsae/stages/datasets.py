"""`patchsae datasets`: the named datasets of the paper (--dataset NAME)."""

from __future__ import annotations

NAME = "datasets"
HELP = "list the named datasets of the paper (--dataset NAME): hub id, splits, classes"
OPTIONS = ()


def cli(args) -> None:
    from patchsae.data.registry import format_table

    print(format_table())

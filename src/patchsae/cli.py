"""`patchsae` command line, generated from the stages: one subcommand per module in `patchsae.stages`, its
options built from the stage's typed option dataclasses (`patchsae.options.opt` fields: name, type, default and
help in one place). Each stage's `cli(given)` receives only the options the user gave, builds its options on its
own defaults and prints its typed report."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
import typing
from dataclasses import MISSING, fields

from patchsae import PatchSAEError

# subcommands in the order `patchsae --help` lists them; module names under patchsae.stages
STAGES = ("cache", "train", "evaluate", "quickstart", "models", "datasets", "analyze", "adapt",
          "compare", "adapt_study", "classify", "serve", "report", "paper")


def _unwrap(tp) -> tuple[object, bool]:
    """(type, optional): `int | None` -> (int, True)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _default_text(f) -> str:
    d = f.default
    if d is MISSING or d is None or d is False or d == ():
        return ""
    return " ({})".format(" ".join(map(str, d)) if isinstance(d, tuple) else d)


def add_fields(p: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """One argument per CLI field of dataclass `cls` (all, or those named in `only`); absent arguments stay
    absent from the parsed namespace (argparse.SUPPRESS), so a stage can tell given values from defaults."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        m = f.metadata
        if not m or not m["cli"] or (only is not None and f.name not in only):
            continue
        tp, _ = _unwrap(hints[f.name])
        help_ = m["help"] + (_default_text(f) if m["show_default"] else "")
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        if tp is bool:
            if f.default is True:
                flag = m["flag"] or "--no-" + f.name.replace("_", "-")
            kw["action"] = "store_false" if f.default is True else "store_true"
        elif typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            kw["type"] = _unwrap(args[0])[0]
            kw["nargs"] = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
        else:
            kw["type"] = tp
        for key in ("metavar", "choices", "required"):
            if m[key]:
                kw[key] = m[key]
        p.add_argument(flag, **kw)


def given(args: argparse.Namespace, cls: type, only: tuple[str, ...] | None = None) -> dict:
    """The fields of `cls` the user gave, lists turned into tuples."""
    names = {f.name for f in fields(cls) if only is None or f.name in only}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="patchsae",
        description="Sparse autoencoders on every token of a CLIP vision transformer (PatchSAE). "
                    "Each stage reads and writes one run directory.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for name in STAGES:
        stage = importlib.import_module(f"patchsae.stages.{name}")
        p = sub.add_parser(stage.NAME, help=stage.HELP, description=stage.HELP)
        if getattr(stage, "RUN_HELP", None):
            p.add_argument("--run", required=True, help=stage.RUN_HELP)
        for entry in stage.OPTIONS:
            cls, only = entry if isinstance(entry, tuple) else (entry, None)
            add_fields(p, cls, only)
        p.set_defaults(stage=stage)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in ("cache", "train"):
            raise PatchSAEError(f"`{args.command}` runs in one process; under torchrun only `cache` and `train` "
                                "are distributed")
        args.stage.cli(args)
    except PatchSAEError as exc:
        print(f"patchsae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchsae: interrupted; rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

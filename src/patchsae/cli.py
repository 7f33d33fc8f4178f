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
          "compare", "adapt_study", "classify", "probe", "serve", "report", "import_sae", "export",
          "paper", "ablate")
CONFIG_HELP = ("JSON or TOML file (by its .toml suffix) of option names and values, e.g. a run's own "
               "config.json; a table named after the stage applies to that stage only; the command line overrides it")


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
        if stage.OPTIONS:
            p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help=CONFIG_HELP)
        p.set_defaults(stage=stage, parser=p)
    return ap


def _names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config-file names of a parser's options: each long flag without its dashes (`--top-k` -> top_k), and for
    a flag that turns a field off (`--no-x`) also the field's name (x = false), as its dest holds the field."""
    names = {}
    for a in parser._actions:
        if a.dest in ("help", "config"):
            continue
        for flag in a.option_strings:
            if flag.startswith("--"):
                names[flag[2:].replace("-", "_")] = a
        if isinstance(a, argparse._StoreFalseAction):
            names[a.dest] = a
    return names


def _known() -> tuple[set[str], set[str]]:
    """(every option name of every stage, every stage name): a config file may hold other stages' options, e.g.
    a run's config.json given to evaluate, and tables for other stages."""
    names, stages = set(), set()
    for name in STAGES:
        stage = importlib.import_module(f"patchsae.stages.{name}")
        stages |= {stage.NAME, stage.NAME.replace("-", "_")}
        p = argparse.ArgumentParser(add_help=False)
        for entry in stage.OPTIONS:
            cls, only = entry if isinstance(entry, tuple) else (entry, None)
            add_fields(p, cls, only)
        names |= set(_names(p))
    return names, stages


def apply_config_file(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options the command line did not give from `--config FILE`: its top-level keys, then those of a
    table named after the stage. Keys are option names as `--help` spells them (so analyze's `--top-k` is top_k,
    never the run's TopK `k`); values are checked by the same types and choices as the command line."""
    from patchsae.utils import read_config_file

    path = getattr(args, "config", None)
    if path is None:
        return args
    data = read_config_file(path)
    stage_keys = {args.stage.NAME, args.stage.NAME.replace("-", "_")}
    flat = {k: v for k, v in data.items() if not isinstance(v, dict) or k not in stage_keys}
    for key in stage_keys:
        if isinstance(data.get(key), dict):
            flat.update(data[key])
    actions = _names(args.parser)
    known, stages = _known()
    for key, value in flat.items():
        name = key.replace("-", "_")
        if isinstance(value, dict) and name in stages:
            continue  # another stage's table
        if name not in known | {"run"}:
            raise PatchSAEError(f"{path}: unknown option {key!r}")
        action = actions.get(name)
        if action is None or action.dest in vars(args):
            continue  # another stage's option, or given on the command line (which wins)
        value = _checked(action, value, key, path)
        if isinstance(action, argparse._StoreFalseAction) and name != action.dest:
            value = not value  # no_x = true means x = false
        setattr(args, action.dest, value)
    return args


def _checked(action: argparse.Action, value, key: str, path) -> object:
    """A config value as the command line would have produced it, or one line saying why not."""
    if value is None:
        return None
    conv = action.type
    try:
        if action.nargs not in (None, 0):
            value = tuple(conv(v) if conv else v for v in (value if isinstance(value, (list, tuple)) else [value]))
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
        elif conv is not None and not isinstance(value, conv):
            if conv is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif isinstance(value, str) or (conv is str and not isinstance(value, (dict, list))):
                value = conv(value)
            else:
                raise ValueError(f"expected {conv.__name__}, got {type(value).__name__}")
    except (TypeError, ValueError) as exc:
        raise PatchSAEError(f"{path}: option {key!r}: {value!r} is not valid ({exc})") from None
    if action.choices and value not in action.choices:
        raise PatchSAEError(f"{path}: option {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value  # a flag's dest holds its field's value, so booleans pass through as they are


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in ("cache", "train"):
            raise PatchSAEError(f"`{args.command}` runs in one process; under torchrun only `cache` and `train` "
                                "are distributed")
        args.stage.cli(apply_config_file(args))
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

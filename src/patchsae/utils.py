"""Small helpers shared by every stage: atomic writes and JSON."""

from __future__ import annotations

import errno
import glob
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from patchsae import PatchSAEError


# errors of the disk or file system, as opposed to bugs: a write failing with one of these is one error line
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM,
                errno.ENODEV}


def write_error(path: Path, exc: OSError) -> PatchSAEError:
    return PatchSAEError(f"cannot write {path}: {exc.strerror or exc} (the previous version, if any, is unchanged)")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A run killed mid-write therefore leaves the previous file (or none), never half a file. A full disk or an
    I/O error while writing or renaming is one PatchSAEError line naming `path`; the temporary file is removed.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, path)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed earlier write
            stale.unlink(missing_ok=True)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise write_error(path, exc) from None
    finally:
        if tmp_path is not None and (tmp_path.exists() or tmp_path.is_symlink()):
            tmp_path.unlink()


def tensors_digest(tensors: dict) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order: the same tensors give the same digest, so
    a file pair (weights + config) can say that both halves come from one save, and reruns stay bit-identical."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> str:
    """A safetensors file, written atomically and byte for byte reproducibly: the same tensors and metadata
    always give the same bytes (the library's own writer orders metadata keys differently on every call), with
    the tensors' digest in the metadata (returned, for a config written beside it to name). A full disk is a
    plain OSError here, so `atomic_path` turns it into one line naming the file."""
    import torch

    digest = tensors_digest(tensors)
    flat = {name: tensors[name].detach().contiguous().cpu() for name in sorted(tensors)}
    header, offset = {"__metadata__": dict(sorted({**(metadata or {}), "digest": digest}.items()))}, 0
    for name, t in flat.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in flat.values():
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return digest


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def csv_text(header: list, rows) -> str:
    """CSV text (\\n line ends) of a header row and data rows: what every stage's .csv file holds."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


# words that must never reach a user in an error line about a file they may not trust
UNSAFE_ADVICE = ("weights_only=False", "weights_only` set to `False", "trusted source", "trust the source")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), cut to `limit` characters, with any advice to
    turn off safe loading removed."""
    first = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    if not first or any(a in first for a in UNSAFE_ADVICE):
        return type(exc).__name__
    return f"{type(exc).__name__}: {first[:limit]}"


def read_json_file(path: str | Path, what: str = "JSON file") -> Any:
    """`read_json` for a file a user may have edited or damaged: any unreadable, undecodable or non-standard
    JSON (NaN, Infinity, numbers too large for a float) is one PatchSAEError line naming the file."""
    try:
        return json.loads(Path(path).read_bytes(), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (OSError, ValueError, RecursionError) as exc:
        raise PatchSAEError(f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc)[:200]})") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def dataclass_from_json(cls: type, data: Any, where: str, allow_unknown: bool = False):
    """`cls(**data)` for a JSON object whose every value has the type its field declares (int, float, str,
    bool, X | None, tuple[X, ...] from a list); otherwise one PatchSAEError line naming `where` and the field.
    A config with `"layer": "abc"` would otherwise load and fail later, far from the file."""
    import dataclasses
    import typing

    if not isinstance(data, dict):
        raise PatchSAEError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown and not allow_unknown:
        raise PatchSAEError(f"{where}: unknown settings {unknown[:5]}")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise PatchSAEError(f"{where}: missing settings {missing}")
    values = {}
    for name in names & set(data):
        try:
            values[name] = _typed(data[name], hints[name])
        except (TypeError, ValueError) as exc:
            raise PatchSAEError(f"{where}: setting {name!r} {exc}") from None
    return cls(**values)


def _typed(value: Any, hint: Any) -> Any:
    """`value` checked (and lists turned into tuples) against a type hint; TypeError says what was wrong."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _typed(value, arm)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"must be {' or '.join(_name(a) for a in args)}, not {_shown(value)}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63:
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e308:
            return float(value)  # (the bound, not isfinite: isfinite overflows on integers beyond a float)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list) and isinstance(value, list):
        item = args[0] if args else Any
        return (tuple if origin is tuple else list)(_typed(v, item) for v in value)
    elif hint is Any or origin is dict and isinstance(value, dict):
        return value
    raise TypeError(f"must be {_name(hint)}, not {_shown(value)}")


def _name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _shown(value: Any) -> str:
    text = str(value) if isinstance(value, (int, float)) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it becomes `path` only if the block succeeds.

    An existing `path` is refused unless `force`, and then replaced only once the new folder is complete, so a
    failure (or a kill) leaves the old one as it was.
    """
    import shutil

    from patchsae import PatchSAEError

    path = Path(path)
    if path.exists() and not force:
        raise PatchSAEError(f"{path} already exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_config_file(path: str | Path) -> dict:
    """A mapping of options from a JSON or TOML file (by suffix; `.toml` is TOML, anything else JSON), or one
    PatchSAEError line saying why not."""
    from patchsae import PatchSAEError

    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PatchSAEError(f"{path}: cannot read config file ({getattr(exc, 'strerror', None) or exc})") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise PatchSAEError(f"{path}: TOML needs Python 3.11+ or `pip install tomli`; "
                                    "or write the file as JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PatchSAEError(f"{path}: not valid TOML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PatchSAEError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PatchSAEError(f"{path}: a config file holds a mapping of option names to values")
    return data

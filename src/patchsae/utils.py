"""Small helpers shared by every stage: atomic writes and JSON."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A run killed mid-write therefore leaves the previous file (or none), never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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

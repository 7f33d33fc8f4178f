"""Generated hostile files for the loader fuzz tests (tests/test_fuzz.py): hypothesis profiles, the per-family
case counter, byte-level mutations, JSON values, and pickles whose unpickling would run code.

Profiles (PATCHSAE_FUZZ selects one): `ci` (default, inside `make test`): a fixed seed and a few dozen cases per
test, seconds in all; `full` (`make fuzz`): 1,000 cases per test function, a fresh seed each run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from patchsae import PatchSAEError
from patchsae.utils import UNSAFE_ADVICE

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=int(os.environ.get("PATCHSAE_FUZZ_CI_CASES", "15")), derandomize=True,
                          **_COMMON)
settings.register_profile("full", max_examples=int(os.environ.get("PATCHSAE_FUZZ_CASES", "1000")), **_COMMON)
PROFILE = os.environ.get("PATCHSAE_FUZZ", "ci")
settings.load_profile(PROFILE)

COUNTS: Counter = Counter()  # family -> cases run


def count(family: str) -> None:
    COUNTS[family] += 1


def write_counts() -> None:
    """Add this process's counts to $PATCHSAE_FUZZ_COUNTS (a JSON object), for `make fuzz`'s last line."""
    out = os.environ.get("PATCHSAE_FUZZ_COUNTS")
    if not out:
        return
    path = Path(out)
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({k: old.get(k, 0) + COUNTS.get(k, 0) for k in old.keys() | COUNTS.keys()}))


# ---- the contract every case must meet ----------------------------------------------------------------------

def load_or_error(fn):
    """(result, None) for a load, (None, message) for one PatchSAEError line; anything else propagates and
    fails the case. The message must be one line and must not advise turning off safe loading."""
    try:
        return fn(), None
    except PatchSAEError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg, repr(msg)
        assert not any(a in msg for a in UNSAFE_ADVICE), msg
        return None, msg


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@contextmanager
def contained(case_dir: Path, sentinel: Path):
    """The case runs with `case_dir` as working directory; afterwards nothing in it may have changed (loaders
    only read) and the sentinel folder outside it, where every payload aims, must still be empty."""
    before, cwd = _listing(case_dir), os.getcwd()
    os.chdir(case_dir)
    try:
        yield
    finally:
        os.chdir(cwd)
    assert _listing(case_dir) == before, "a loader wrote into the case folder"
    assert not any(sentinel.iterdir()), f"a payload ran: {sorted(p.name for p in sentinel.iterdir())}"


# ---- byte mutations -----------------------------------------------------------------------------------------

@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` with a few random edits: truncation, byte flips, inserted or deleted runs, or unchanged."""
    kind = draw(st.sampled_from(["same", "truncate", "flip", "insert", "delete", "mixed"]))
    buf = bytearray(data)
    if kind in ("truncate", "mixed") and buf:
        del buf[draw(st.integers(0, len(buf) - 1)):]
    if kind in ("flip", "mixed") and buf:
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    if kind == "insert":
        at = draw(st.integers(0, len(buf)))
        buf[at:at] = draw(st.binary(min_size=1, max_size=64))
    if kind == "delete" and buf:
        at = draw(st.integers(0, len(buf) - 1))
        del buf[at: at + draw(st.integers(1, 64))]
    return bytes(buf)


def json_values(max_leaves: int = 12):
    """Any JSON value, including NaN, infinities and integers far beyond 64 bits."""
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(-10**400, 10**400)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
    return st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                           max_size=4),
                        max_leaves=max_leaves)


@st.composite
def mutated_json(draw, valid: dict) -> bytes:
    """A valid JSON object with one field replaced, removed or added, or its text damaged, or any JSON at all."""
    kind = draw(st.sampled_from(["replace", "replace", "remove", "add", "nested", "text", "any"]))
    obj = json.loads(json.dumps(valid))
    if kind == "any":
        return json.dumps(draw(json_values())).encode()
    if kind == "text":
        return draw(mutated(json.dumps(valid).encode()))
    keys = sorted(obj)
    if kind == "replace" and keys:
        obj[draw(st.sampled_from(keys))] = draw(json_values(4))
    elif kind == "remove" and keys:
        del obj[draw(st.sampled_from(keys))]
    elif kind == "add":
        obj[draw(st.text(max_size=8))] = draw(json_values(4))
    elif kind == "nested":
        nested = [k for k in keys if isinstance(obj[k], (dict, list)) and obj[k]]
        if nested:
            inner = obj[draw(st.sampled_from(nested))]
            slot = draw(st.sampled_from(sorted(inner) if isinstance(inner, dict) else range(len(inner))))
            inner[slot] = draw(json_values(4))
    return json.dumps(obj).encode()


# ---- pickles that would run code ----------------------------------------------------------------------------

# (module, function, how to call it so that it leaves a file named `mark` in the sentinel folder)
PAYLOADS = [
    ("os", "system", lambda m: (f"touch {m}",)),
    ("posix", "system", lambda m: (f"touch {m}",)),
    ("subprocess", "call", lambda m: (["touch", str(m)],)),
    ("subprocess", "Popen", lambda m: (["touch", str(m)],)),
    ("builtins", "exec", lambda m: (f"open({str(m)!r}, 'w').close()",)),
    ("builtins", "eval", lambda m: (f"open({str(m)!r}, 'w')",)),
    ("builtins", "open", lambda m: (str(m), "w")),
    ("io", "open", lambda m: (str(m), "w")),
    ("os", "mkdir", lambda m: (str(m),)),
    ("shutil", "copyfile", lambda m: (os.devnull, str(m))),
    ("pathlib", "Path.touch", None),
    ("runpy", "run_path", None),
    ("torch", "save", lambda m: ({}, str(m))),
    ("numpy", "save", lambda m: (str(m), [1])),
]


def payload_pickle(module: str, name: str, args: tuple, protocol: int = 2) -> bytes:
    """A pickle stream that calls module.name(*args) when unpickled (GLOBAL + REDUCE), written opcode by opcode
    so the callable need not exist here."""
    body = pickle.dumps(args, protocol=protocol)
    assert body[:2] == bytes([0x80, protocol]) and body[-1:] == b"."
    return bytes([0x80, protocol]) + b"c" + f"{module}\n{name}\n".encode() + body[2:-1] + b"R."


class Reduce:
    """An object whose pickle calls `fn(*args)`: torch.save embeds it like any scheduler object."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payload_object(module: str, name: str, mark: Path):
    """A live object for torch.save whose unpickling would leave `mark`; None for names not importable here."""
    import importlib

    entry = next(p for p in PAYLOADS if p[0] == module and p[1] == name)
    if entry[2] is None:
        return None
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return Reduce(fn, entry[2](mark))


def torch_bytes(obj, legacy: bool = False) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def summary(path: str) -> str:
    """`make fuzz`'s last line: the cases run per loader family (the run got here only with zero failures)."""
    counts = json.loads(Path(path).read_text())
    families = ("images", "safetensors", "json", "caches", "pickles")
    return ("fuzz: " + ", ".join(f"{f} {counts.get(f, 0):,}" for f in families)
            + f" cases ({sum(counts.values()):,} in all), 0 failures")


if __name__ == "__main__":
    import sys

    print(summary(sys.argv[1]))

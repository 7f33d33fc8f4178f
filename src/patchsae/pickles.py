"""Reading pickled checkpoints (`.pt`, `.pth`, `.pth.tar`) a user points at, without ever running their code.

Every pickled file goes through `load_pickled`: `torch.load(weights_only=True)`, with each global the file names
beyond tensors and containers bound to `Inert`, a stand-in that only stores its arguments (so a checkpoint that
pickles, say, a learning-rate scheduler object still yields its tensors). Globals torch blocks outright (`os`,
`subprocess`, `builtins.exec`, ...) make the load fail. Every failure becomes one `PatchSAEError` line written
here, never torch's own text: that text advises re-running with `weights_only=False`, which on an untrusted
file runs whatever the file asks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from patchsae import PatchSAEError
from patchsae.utils import one_line



class Inert:
    """Stands in for any class or function a checkpoint names beyond tensors and containers (e.g. Dassl's LR
    scheduler objects): it only stores what the pickle hands it and never runs any of the named code."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def load_pickled(path: str | Path, what: str = "checkpoint") -> Any:
    """The object pickled in `path` (tensors, containers, numbers, strings; other globals as `Inert`), or one
    `PatchSAEError` line naming the file and why it was refused."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    path = Path(path)
    if not path.is_file():
        raise PatchSAEError(f"{what} {path}: no such file")
    try:
        try:
            stubs = [(Inert, name) for name in get_unsafe_globals_in_checkpoint(str(path))]
        except (ValueError, RuntimeError):  # torch's pre-1.6 (non-zip) format cannot be scanned: no stand-ins
            stubs = []
        with safe_globals(stubs):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or hostile files fail in many library-specific ways
        raise PatchSAEError(f"{path}: not a readable PyTorch checkpoint ({refusal_reason(exc)})") from None


def refusal_reason(exc: BaseException) -> str:
    """A one-line reason for a failed torch.load, in our words where torch's would advise an unsafe action."""
    text = str(exc)
    blocked = re.search(r"unsupported GLOBAL (\S+)", text)
    if blocked:
        return (f"it names {blocked.group(1)}, which could run code when unpickled; only tensors and plain "
                "containers are read from pickled files")
    if "Weights only load failed" in text or "weights_only" in text:
        return "it holds pickled objects other than tensors and plain containers, which are never unpickled"
    return one_line(exc)

"""Interrupting stages in tests: a full disk or I/O error at the k-th write (`WriteFault`, in-process), and
SIGKILL at chosen moments (tests/test_kill.py): the stage runs in a forked child of the test process
(torch already imported, so a run costs its work, not an interpreter start) and is killed with SIGKILL, either
at its k-th file write (half the bytes written into the temporary file, or just after the rename) or after a
delay. Then the same command reruns to completion and its files are compared with an uninterrupted run's.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def import_all() -> None:
    """Import every patchsae module now (stages import theirs lazily)."""
    import importlib
    import pkgutil

    import patchsae

    for info in pkgutil.walk_packages(patchsae.__path__, "patchsae."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


FAULTS = {"ENOSPC": (errno.ENOSPC, "No space left on device"), "EIO": (errno.EIO, "Input/output error")}


class WriteFault:
    """Patches `atomic_path` everywhere it was imported: the `fail_at`-th write (0-based) has half its bytes
    written, then fails with `fault`; `where` = "write" fails inside the write, "rename" at the final rename."""

    def __init__(self, monkeypatch, fail_at: int | None, fault: str = "ENOSPC", where: str = "write"):
        self.calls, self.paths, self.fail_at, self.fault, self.where = 0, [], fail_at, FAULTS[fault], where
        from patchsae import utils

        import_all()  # a module first imported while patched would keep the faulty writer after the test

        real = utils.atomic_path
        outer = self

        @contextmanager
        def faulty(path):
            n = outer.calls
            outer.calls += 1
            outer.paths.append(Path(path))
            with real(path) as tmp:
                yield tmp
                if n == outer.fail_at:
                    if outer.where == "write":
                        data = tmp.read_bytes() if tmp.exists() else b""
                        tmp.write_bytes(data[: len(data) // 2])
                        raise OSError(*outer.fault)
                    monkeypatch.setattr(utils.os, "replace", _failing_replace(outer.fault))

        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("patchsae") and getattr(mod, "atomic_path", None) is real:
                monkeypatch.setattr(mod, "atomic_path", faulty)


def _failing_replace(fault):
    real = os.replace

    def replace(src, dst):
        os.replace = real  # only this one rename fails
        raise OSError(*fault)

    return replace


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_write_killer(kill_at: int, when: str, counter: list) -> None:
    """Patch `atomic_path` in every loaded patchsae module so that the child kills itself at write `kill_at`."""
    from patchsae import utils

    real = utils.atomic_path

    @contextmanager
    def killing(path):
        n = counter[0]
        counter[0] += 1
        with real(path) as tmp:
            yield tmp
            if n == kill_at and when == "mid":
                data = tmp.read_bytes() if tmp.exists() else b""
                tmp.write_bytes(data[: len(data) // 2])
                _kill_self()
        if n == kill_at and when == "after":
            _kill_self()

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("patchsae") and getattr(mod, "atomic_path", None) is real:
            setattr(mod, "atomic_path", killing)


def run_forked(argv: list[str], kill_at: int | None = None, when: str = "mid", delay: float | None = None,
               count_file: Path | None = None) -> int:
    """Run `patchsae argv` in a forked child; return how it ended: the exit code, or -9 when it was killed.
    `count_file`: the child writes the number of atomic writes it made there (to choose kill points)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            import torch

            torch.set_num_threads(1)
            counter = [0]
            _install_write_killer(kill_at if kill_at is not None else -1, when, counter)
            from patchsae import cli

            code = cli.main(argv)
            if count_file is not None:
                count_file.write_text(str(counter[0]))
        except BaseException:  # noqa: BLE001 - report and leave with a failure code, never unwind into pytest
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if delay is not None:
        end = time.monotonic() + delay
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# JSON keys that record wall-clock time (seconds per phase): the only part of a run that is not deterministic
TIMING_KEYS = ("seconds",)


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`: relative name -> bytes (JSON files without their timing keys)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix == ".json":
                try:
                    data = json.dumps(_without_timing(json.loads(data)), sort_keys=True).encode()
                except ValueError:
                    pass
            out[str(p.relative_to(folder))] = data
    return out


def fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst

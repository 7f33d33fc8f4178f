"""The blocks of a multi-layer run as the explorer serves them: one `Explorer` open at a time, reopened when the
page switches block (`POST /api/layer/{L}`), so memory holds one block's SAE and analysis, never all of them."""

from __future__ import annotations

import threading
from typing import Callable

from patchsae import PatchSAEError
from patchsae.runs import Run


class Blocks:
    """Which block the explorer shows and the `Explorer` for it. `opener(run_at_block)` builds an Explorer; a
    single-layer run has one block and never reopens."""

    def __init__(self, run: Run, opener: Callable[[Run], object], layer: int | None = None):
        self.run, self._open = run, opener
        self.layers = run.hooked_layers()  # None: a single-layer run
        self._lock = threading.Lock()
        self.current = opener(run.at(layer))

    @classmethod
    def single(cls, explorer) -> Blocks:
        """An already open Explorer as the only block (tests, the static report, single-layer runs)."""
        blocks = cls.__new__(cls)
        blocks.run, blocks._open, blocks.layers = explorer.run, None, None
        blocks._lock, blocks.current = threading.Lock(), explorer
        return blocks

    def analysed(self) -> list[int]:
        """The run's blocks that `analyze` has written statistics for (the ones the page can switch to)."""
        if self.layers is None:
            return [self.current.layer]
        return [l for l in self.layers if self.run.at(l).analysis_dir.exists()]

    def switch(self, layer: int):
        """The Explorer for block `layer` (the current one if it is already shown), or one line naming the
        blocks there are. Requests already running on the old block finish on it."""
        with self._lock:
            if layer == self.current.layer:
                return self.current
            if self.layers is None or self._open is None:
                raise PatchSAEError(f"this run hooks only block {self.current.layer}; block {layer} needs a run "
                                    "cached with --layers")
            if layer not in self.analysed():
                raise PatchSAEError(f"block {layer} is not one of this run's analysed blocks {self.analysed()}")
            self.current = self._open(self.run.at(layer))
            return self.current

    def info(self) -> dict:
        return {"layers": self.analysed()}

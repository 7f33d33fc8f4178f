"""Experiment tracking behind one small interface: `open_tracker(kind, log_dir, name, config)` gives an object
with `log(step, scalars)` and `close()`, for kind "none", "tensorboard" (event files in log_dir) or "wandb"
(offline into log_dir unless the user configured wandb: WANDB_MODE, or WANDB_API_KEY for online).

Both backends are optional (`pip install -e .[log]`); asking for one that is not installed is one line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

from patchsae import PatchSAEError

TRACKERS = ("none", "tensorboard", "wandb")


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NoTracker:
    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _finite(scalars: dict) -> dict[str, float]:
    """Numbers only (a tracker cannot plot a string or a NaN it would later choke on)."""
    return {k: float(v) for k, v in scalars.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class TensorBoardTracker:
    def __init__(self, log_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PatchSAEError("--log tensorboard needs the tensorboard package: pip install -e .[log]") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))
        if config:
            import json

            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in _finite(scalars).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    def __init__(self, log_dir: Path, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise PatchSAEError("--log wandb needs the wandb package: pip install -e .[log]") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "patchsae"), name=name, dir=str(log_dir),
                                  config=config, mode=mode, reinit="finish_previous")
        except Exception as exc:  # noqa: BLE001 - wandb raises its own error types for auth, network and modes
            raise PatchSAEError(f"wandb could not start ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                                "set WANDB_MODE=offline to log locally") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(_finite(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, log_dir: str | Path, name: str = "patchsae", config: dict | None = None) -> Tracker:
    if kind not in TRACKERS:
        raise PatchSAEError(f"unknown tracker {kind!r} (choose {', '.join(TRACKERS)})")
    if kind == "none":
        return NoTracker()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if kind == "tensorboard":
        return TensorBoardTracker(log_dir, config or {})
    return WandbTracker(log_dir, name, config or {})

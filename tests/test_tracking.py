"""Experiment tracking: tensorboard's own reader finds what we log; wandb logs offline; a missing backend is one
line."""

from __future__ import annotations

import sys

import pytest

from patchsae import PatchSAEError
from patchsae.sae.tracking import open_tracker


def test_tensorboard_event_file_read_back_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = open_tracker("tensorboard", tmp_path / "logs", config={"lr": 1e-3})
    for step in range(1, 6):
        tr.log(step, {"train/loss": 1.0 / step, "train/l0": 10 + step, "train/lr": 1e-3, "note": "skipped",
                      "bad": float("nan")})
    tr.log(5, {"eval/explained_variance": 0.93})
    tr.close()
    acc = EventAccumulator(str(tmp_path / "logs")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/loss", "train/l0", "train/lr", "eval/explained_variance"}
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    assert [round(e.value, 6) for e in loss] == [round(1.0 / s, 6) for s in range(1, 6)]
    assert acc.Scalars("eval/explained_variance")[0].value == pytest.approx(0.93)


def test_missing_backend_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(PatchSAEError, match=r"pip install -e \.\[log\]"):
        open_tracker("tensorboard", tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(PatchSAEError, match=r"pip install -e \.\[log\]"):
        open_tracker("wandb", tmp_path)
    with pytest.raises(PatchSAEError, match="unknown tracker"):
        open_tracker("mlflow", tmp_path)


def test_wandb_logs_offline_by_default(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tr = open_tracker("wandb", tmp_path / "logs", name="t", config={"k": 4})
    assert tr.run.settings.mode == "offline"
    tr.log(1, {"train/loss": 0.5})
    tr.close()
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0

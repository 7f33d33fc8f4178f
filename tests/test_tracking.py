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


def _two_rank_worker(rank: int, root: str) -> None:
    import torch
    import torch.distributed as tdist
    from helpers import MemTokens, _data

    from patchsae.dist import Dist
    from patchsae.sae.model import SAEConfig
    from patchsae.sae.tracking import NoTracker
    from patchsae.sae.train import TrainConfig, train_sae

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    try:
        tracker = open_tracker("tensorboard", f"{root}/logs") if rank == 0 else NoTracker()
        cfg = TrainConfig(total_tokens=6 * 256, batch_tokens=256, lr=1e-3, warmup_steps=1, init_tokens=512,
                          log_every=2)
        train_sae(SAEConfig(16, 64, "relu", dead_steps=0), cfg, MemTokens(_data()), f"{root}/sae", progress=False,
                  dist=Dist(rank=rank, world=2), tracker=tracker)
        tracker.close()
    finally:
        tdist.destroy_process_group()


def test_two_rank_training_logs_once_and_reduces_on_every_rank(tmp_path):
    """Under torchrun each rank reduces the logged loss parts (ghost grads here, as dead_steps=0), rank 0 alone
    writes; a rank that skipped the reduction would hang the other."""
    import torch.multiprocessing as mp
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mp.start_processes(_two_rank_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")
    acc = EventAccumulator(str(tmp_path / "logs")).Reload()
    assert [e.step for e in acc.Scalars("train/ghost")] == [2, 4, 6]
    assert {"train/l1", "train/l0", "train/lr", "train/dead_fraction"} <= set(acc.Tags()["scalars"])

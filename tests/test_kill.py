"""Kill at any stage (issue 17): each stage of a tiny random-CLIP run is SIGKILLed in a forked child at
several moments (half-way through a file write, just after a write, after a delay), then rerun; the rerun
completes and every file of the run equals an uninterrupted run's, byte for byte. The one exception: the
wall-clock `seconds` that manifests record per phase, which no rerun can reproduce (they are compared without).
`make test` kills each stage at two moments; PATCHSAE_KILL_POINTS=all (`make fuzz`) at four.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from killing import WriteFault, files, fresh_copy, run_forked

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_POINTS = os.environ.get("PATCHSAE_KILL_POINTS") == "all"  # `make fuzz`; `make test` kills twice per stage
SIZES = ["--max-train-images", "48", "--max-eval-images", "16", "--expansion", "4", "--warmup-steps", "5",
         "--batch-tokens", "256"]


def stage_argv(stage: str, run: Path, model: Path) -> list[str]:
    return {
        "cache": ["cache", "--run", str(run), "--model", str(model), *SIZES, "--batch-images", "16"],
        "train": ["train", "--run", str(run)],
        "analyze": ["analyze", "--run", str(run), "--max-images", "16", "--batch-size", "8", "--top-k", "3"],
        "classify": ["classify", "--run", str(run), "--max-rank-images", "16", "--max-eval-images", "16",
                     "--batch-size", "8"],
        "adapt": ["adapt", "--out", str(run / "adapt"), "--model", str(model), "--shots", "2", "--epochs", "2",
                  "--batch-size", "4", "--max-eval-images", "16"],
        "report": ["report", "--run", str(run), "--out", str(run / "site"), "--top", "3", "--class-top", "1"],
        "ablate": ["ablate", "--root", str(run / "ablation"), "--model", str(model), "--max-train-images", "48",
                   "--max-eval-images", "16", "--budget-tokens", "1024", "--batch-tokens", "256", "--warmup-steps",
                   "2", "--cl-batch-size", "8", "--batch-images", "16"],
    }[stage]


RESUME_RECORDS = ("progress.json", ".done.json")  # what an unfinished extraction keeps to resume from

# each stage starts from the finished run of the stage before it in this order
PREVIOUS = {"cache": None, "train": "cache", "analyze": "train", "classify": "analyze", "adapt": "classify",
            "report": "adapt", "ablate": "report"}


@pytest.fixture(scope="module")
def stages(tiny_clip_dir, tmp_path_factory):
    """Uninterrupted runs: per stage, the run directory before it and after it (snapshots on disk), and the
    number of atomic writes it makes."""
    root = tmp_path_factory.mktemp("kill")
    work = root / "work" / "run"
    out = {}
    state = None
    for stage in PREVIOUS:
        before = root / f"before-{stage}"
        if state is None:
            before.mkdir()
        else:
            fresh_copy(state, before)
        fresh_copy(before, work)
        count = root / f"{stage}.count"
        t = time.monotonic()
        assert run_forked(stage_argv(stage, work, tiny_clip_dir), count_file=count) == 0
        seconds = time.monotonic() - t
        after = fresh_copy(work, root / f"after-{stage}")
        out[stage] = (before, after, int(count.read_text()), seconds)
        state = after
    return root, work, out


def _moments(n_writes: int, seconds: float) -> list[tuple]:
    """Kill points: half-way through the first write, just after a middle write, half-way through the last,
    and moments drawn (seeded) from the stage's uninterrupted duration, wherever the work then is (the report,
    which writes its site into a temporary folder and renames it, has no single-file writes: delays only)."""
    rng = random.Random(n_writes)
    writes = [("mid", 0), ("after", n_writes // 2), ("mid", n_writes - 1)] if n_writes else []
    moments = writes + [("delay", rng.uniform(0.2, 0.9) * seconds) for _ in range(1 if writes else 3)]
    return moments if ALL_POINTS else moments[1:2] + moments[-1:]  # `make test`: two per stage


@pytest.mark.parametrize("stage", list(PREVIOUS))
def test_kill_and_rerun_equals_uninterrupted(stages, tiny_clip_dir, stage):
    root, work, out = stages
    before, after, n_writes, seconds = out[stage]
    reference = files(after)
    for when, k in _moments(n_writes, seconds):
        fresh_copy(before, work)
        argv = stage_argv(stage, work, tiny_clip_dir)
        if when == "delay":
            assert run_forked(argv, delay=k) in (-9, 0)  # (a busy machine may let it finish first)
        else:
            assert run_forked(argv, kill_at=k, when=when) == -9
            assert files(work) != reference or (when, k) == ("after", n_writes - 1)
        assert run_forked(stage_argv(stage, work, tiny_clip_dir)) == 0
        got = files(work)
        assert got.keys() == reference.keys(), (when, k, sorted(got.keys() ^ reference.keys()))
        diff = [name for name in reference if got[name] != reference[name]]
        assert not diff, (when, k, diff)
    shutil.rmtree(work)


# `make test`: the two stages whose writers only this test reaches (cache, SAE and prompt writes are failed at
# every write in test_faults.py); `make fuzz`: all five
DISK_FULL = [("analyze", "ENOSPC"), ("classify", "EIO")] + ([("cache", "ENOSPC"), ("train", "EIO"),
                                                             ("adapt", "ENOSPC")] if ALL_POINTS else [])


@pytest.mark.parametrize("stage,fault", DISK_FULL)
def test_disk_full_at_a_stage_write(stages, tiny_clip_dir, stage, fault, monkeypatch, capsys):
    """A full disk (or I/O error) at a middle write of the stage: `patchsae` exits 2 with one line naming the
    file; the run's earlier files are unchanged, every file present is complete (byte-identical to the
    uninterrupted run's), none is left half-written; the rerun completes and equals the uninterrupted run."""
    from patchsae import cli

    root, work, out = stages
    before, after, n_writes, _ = out[stage]
    reference, earlier = files(after), files(before)
    fresh_copy(before, work)
    capsys.readouterr()
    with monkeypatch.context() as m:
        f = WriteFault(m, n_writes // 2, fault)
        assert cli.main(stage_argv(stage, work, tiny_clip_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("patchsae: error: cannot write ") and str(f.paths[n_writes // 2]) in err, err
    got = files(work)
    assert all(got.get(name) == data for name, data in earlier.items())
    partial = sorted(name for name in got if got[name] != reference.get(name) and not name.endswith(RESUME_RECORDS))
    assert not partial, partial
    assert cli.main(stage_argv(stage, work, tiny_clip_dir)) == 0
    assert files(work) == reference

"""`patchsae cache`: extract the hooked block's activations of the training split into the run's fp16 cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patchsae.dist import Dist
from patchsae.runs import Run, RunConfig
from patchsae.stages.setup import ConfigOptions, ExtractOptions, dry_run, init_run, model_for

NAME = "cache"
HELP = "extract the hooked block's activations of the training split into an fp16 cache"
RUN_HELP = "run directory (created if missing)"
OPTIONS = (RunConfig, ConfigOptions, ExtractOptions)


@dataclass(frozen=True)
class CacheReport:
    folder: Path
    split: str
    layer: int  # the resolved hooked block
    n_images: int
    n_tokens_per_image: int
    d_model: int


def run(run: Run, model=None, progress: bool = True, dist: Dist = Dist(), workers: int = 0) -> CacheReport:
    from patchsae.activations.cache import build_cache
    from patchsae.data import open_dataset

    cfg = run.load_config()
    model = model or model_for(cfg, dist)
    ds = open_dataset(cfg.dataset, cfg.train_split, path=cfg.dataset_path)
    folder = run.cache_dir(cfg.train_split)
    m = build_cache(model, ds, cfg.layer, folder, batch_size=cfg.batch_images, max_images=cfg.max_train_images,
                    progress=progress, dist=dist, dtype=cfg.dtype, workers=workers)
    return CacheReport(folder, m["split"], m["layer"], m["n_images"], m["n_tokens_per_image"], m["d_model"])


def format_report(r: CacheReport) -> str:
    return (f"cached {r.n_images} images x {r.n_tokens_per_image} tokens x {r.d_model} (block {r.layer}) in "
            f"{r.folder}")


def cli(args) -> None:
    if getattr(args, "dry_run", False):
        print(dry_run(args))
        return
    run_, dist = init_run(args)
    report = run(run_, dist=dist, workers=getattr(args, "workers", 0))
    if dist.is_main:
        print(format_report(report))

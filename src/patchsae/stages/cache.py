"""`patchsae cache`: extract the hooked block's activations of the training split into the run's fp16 cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patchsae import PatchSAEError
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
    """The first report is the run's first block; `run_layers` has one per block of a multi-layer run."""
    return run_layers(run, model, progress, dist, workers)[0]


def run_layers(run: Run, model=None, progress: bool = True, dist: Dist = Dist(), workers: int = 0
               ) -> list[CacheReport]:
    """Cache every hooked block of the run from one forward pass per image (one block unless --layers)."""
    from patchsae.activations.cache import build_caches
    from patchsae.data import open_dataset
    from patchsae.runs.config import resolve_layers
    from patchsae.utils import read_json, write_json

    cfg = run.load_config()
    model = model or model_for(cfg, dist)
    ds = open_dataset(cfg.dataset, cfg.train_split, path=cfg.dataset_path)
    layers = resolve_layers(cfg, model.n_layers)
    if cfg.layers is not None:
        index = {"n_blocks": model.n_layers, "layers": layers}
        if run.layers_file.exists() and read_json(run.layers_file) != index:
            raise PatchSAEError(f"{run.layers_file} records other blocks than --layers gives; use a new run directory")
        if dist.is_main:
            write_json(run.layers_file, index)
    views = [run] if cfg.layers is None else [Run(run.path, layer) for layer in layers]
    folders = [v.cache_dir(cfg.train_split) for v in views]
    ms = build_caches(model, ds, layers, folders, batch_size=cfg.batch_images, max_images=cfg.max_train_images,
                      progress=progress, dist=dist, dtype=cfg.dtype, workers=workers)
    return [CacheReport(f, m["split"], m["layer"], m["n_images"], m["n_tokens_per_image"], m["d_model"])
            for f, m in zip(folders, ms)]


def format_report(r: CacheReport) -> str:
    return (f"cached {r.n_images} images x {r.n_tokens_per_image} tokens x {r.d_model} (block {r.layer}) in "
            f"{r.folder}")


def cli(args) -> None:
    if getattr(args, "dry_run", False):
        print(dry_run(args))
        return
    run_, dist = init_run(args)
    reports = run_layers(run_, dist=dist, workers=getattr(args, "workers", 0))
    if dist.is_main:
        print("\n".join(map(format_report, reports)))

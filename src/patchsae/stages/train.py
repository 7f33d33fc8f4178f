"""`patchsae train`: train the SAE on the run's cached activations (or on the fly), resuming from its last
checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.dist import Dist
from patchsae.options import opt
from patchsae.runs import Run, RunConfig
from patchsae.stages.setup import ConfigOptions, ExtractOptions, dry_run, init_run, model_for

NAME = "train"
HELP = "train the SAE on the cached activations (resumes from its last checkpoint)"
RUN_HELP = "run directory (created if missing)"


@dataclass(frozen=True)
class TrainOptions:
    on_the_fly: bool = opt(False, "extract activations at every step instead of reading the cache")


@dataclass(frozen=True)
class LogOptions:
    log: str = opt("none", "experiment tracker: tensorboard (event files in DIR/logs) or wandb (offline in DIR/logs "
                   "unless WANDB_MODE / WANDB_API_KEY say otherwise); needs `pip install -e .[log]`",
                   choices=("none", "tensorboard", "wandb"))


OPTIONS = (TrainOptions, LogOptions, RunConfig, ConfigOptions, ExtractOptions)


@dataclass(frozen=True)
class TrainReport:
    folder: Path
    sae: object  # the trained patchsae.sae.model.SAE


def run(run: Run, progress: bool = True, on_the_fly: bool = False, dist: Dist = Dist(),
        log: str = "none", workers: int = 0) -> TrainReport:
    """Train on the run's cache, or (on_the_fly) extract activations for every step with no cache (decoding
    images in `workers` processes). Under
    torchrun (`dist`), every rank trains on its slice of each global batch of the cache. `log` names the
    tracker that receives the training curves (and, through DIR/logs/tracker.json, evaluate's metrics). A
    multi-layer run trains one SAE per block, each with the same recipe; the report is the first block's."""
    views = run.layer_runs() if run.layer is None else [run]
    if len(views) > 1 and on_the_fly:
        raise PatchSAEError("--on-the-fly trains one block; a multi-layer run trains from its caches")
    if run.layer is None and run.load_config().layers is not None and run.hooked_layers() is None:
        raise PatchSAEError(f"{run.path} hooks several blocks: run `patchsae cache --run {run.path}` first")
    return [_train_one(v, progress, on_the_fly, dist, log, workers) for v in views][0]


def _train_one(run: Run, progress: bool, on_the_fly: bool, dist: Dist, log: str, workers: int) -> TrainReport:
    from patchsae.activations.cache import ActivationCache
    from patchsae.activations.tokens import CachedTokens, StreamedTokens
    from patchsae.sae.model import SAEConfig
    from patchsae.sae.train import TrainConfig, train_sae

    cfg = run.load_config()
    _refuse_retraining_an_import(run)
    if on_the_fly:
        from patchsae.data import open_dataset
        from patchsae.data.base import FirstN

        if dist.active:
            raise PatchSAEError("--on-the-fly trains in one process; cache first (`torchrun ... patchsae cache`) "
                                "to train on several")
        model = model_for(cfg)
        ds = FirstN(open_dataset(cfg.dataset, cfg.train_split, path=cfg.dataset_path), cfg.max_train_images)
        source = StreamedTokens(model, ds, cfg.layer, cfg.tokens, seed=cfg.seed, dtype=cfg.dtype, workers=workers)
        d_model, layer = model.d_model, model.resolve_layer(cfg.layer)
    else:
        cache = ActivationCache(run.cache_dir(cfg.train_split))
        source = CachedTokens(cache, cfg.tokens, seed=cfg.seed)
        d_model, layer = cache.d_model, cache.manifest["layer"]
    sae_cfg = SAEConfig(d_model=d_model, d_sae=cfg.expansion * d_model, arch=cfg.arch, k=cfg.k,
                        l1_coeff=cfg.l1_coeff, l0_coeff=cfg.l0_coeff, objective=cfg.objective,
                        mse_cls_coefficient=cfg.mse_cls_coefficient)
    train_cfg = TrainConfig(total_tokens=int(cfg.epochs * source.n_tokens), batch_tokens=cfg.batch_tokens,
                            lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed, device=cfg.device,
                            sae_dtype=cfg.sae_dtype)
    # every rank gets a tracker when one is asked for (the others a silent one), so all take part in reducing
    # the logged loss parts; only rank 0's writes
    from patchsae.sae.tracking import NoTracker

    tracker = open_run_tracker(run, log, cfg.to_json()) if dist.is_main else (NoTracker() if log != "none" else None)
    try:
        sae = train_sae(sae_cfg, train_cfg, source, run.sae_dir, progress=progress,
                        provenance={"model": cfg.model, "layer": layer, "tokens": cfg.tokens}, dist=dist,
                        tracker=tracker)
    finally:
        if tracker is not None:
            tracker.close()
    return TrainReport(run.sae_dir, sae)


def open_run_tracker(run: Run, kind: str | None = None, config: dict | None = None):
    """The run's tracker: `kind` (recorded in DIR/logs/tracker.json for later stages), or the recorded one when
    kind is None; None when there is none."""
    from patchsae.sae.tracking import open_tracker
    from patchsae.utils import read_json, write_json

    if kind is None:
        if not run.tracker_file.exists():
            return None
        kind = read_json(run.tracker_file).get("kind", "none")
    if kind == "none":
        return None
    tracker = open_tracker(kind, run.logs_dir, name=run.path.name, config=config)
    write_json(run.tracker_file, {"kind": kind})
    return tracker


def _refuse_retraining_an_import(run: Run) -> None:
    """An imported SAE has no training checkpoint: training would silently replace it."""
    from patchsae.runs.artefacts import sae_origin

    if sae_origin(run) is not None and not (run.sae_dir / "checkpoint.safetensors").exists():
        raise PatchSAEError(f"{run.path} holds an imported SAE; train in a new run directory")


def cli(args) -> None:
    if getattr(args, "dry_run", False):
        print(dry_run(args))
        return
    run_, dist = init_run(args)
    r = run(run_, on_the_fly=getattr(args, "on_the_fly", False), dist=dist, log=getattr(args, "log", "none"),
            workers=getattr(args, "workers", 0))
    if dist.is_main:
        for v in run_.layer_runs():
            c = r.sae.cfg
            print(f"trained SAE {c.d_model} -> {c.d_sae} ({c.arch}, {c.objective} objective) in {v.sae_dir}")

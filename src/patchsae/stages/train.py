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


OPTIONS = (TrainOptions, RunConfig, ConfigOptions, ExtractOptions)


@dataclass(frozen=True)
class TrainReport:
    folder: Path
    sae: object  # the trained patchsae.sae.model.SAE


def run(run: Run, progress: bool = True, on_the_fly: bool = False, dist: Dist = Dist(),
        workers: int = 0) -> TrainReport:
    """Train on the run's cache, or (on_the_fly) extract activations for every step with no cache (decoding
    images in `workers` processes). Under torchrun (`dist`), every rank trains on its slice of each global batch
    of the cache."""
    from patchsae.activations.cache import ActivationCache
    from patchsae.activations.tokens import CachedTokens, StreamedTokens
    from patchsae.sae.model import SAEConfig
    from patchsae.sae.train import TrainConfig, train_sae

    cfg = run.load_config()
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
                        l1_coeff=cfg.l1_coeff, l0_coeff=cfg.l0_coeff)
    train_cfg = TrainConfig(total_tokens=int(cfg.epochs * source.n_tokens), batch_tokens=cfg.batch_tokens,
                            lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed, device=cfg.device,
                            sae_dtype=cfg.sae_dtype)
    sae = train_sae(sae_cfg, train_cfg, source, run.sae_dir, progress=progress,
                    provenance={"model": cfg.model, "layer": layer, "tokens": cfg.tokens}, dist=dist)
    return TrainReport(run.sae_dir, sae)


def cli(args) -> None:
    if getattr(args, "dry_run", False):
        print(dry_run(args))
        return
    run_, dist = init_run(args)
    r = run(run_, on_the_fly=getattr(args, "on_the_fly", False), dist=dist, workers=getattr(args, "workers", 0))
    if dist.is_main:
        c = r.sae.cfg
        print(f"trained SAE {c.d_model} -> {c.d_sae} ({c.arch}) in {r.folder}")

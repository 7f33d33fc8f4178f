"""The stages of a run, each a function of the run directory: cache -> train -> evaluate."""

from __future__ import annotations

import sys
import time

from patchsae import PatchSAEError
from patchsae.dist import Dist
from patchsae.run import Run, RunConfig
from patchsae.utils import read_json, write_json

SUMMARY_KEYS = ("model", "dataset", "layer", "d_model", "d_sae", "arch", "tokens_trained", "mse",
                "explained_variance", "l0_per_token", "dead_fraction", "zero_shot_accuracy",
                "spliced_accuracy", "zero_ablated_accuracy", "seconds")


def _model(cfg: RunConfig, dist: Dist = Dist()):
    from patchsae.models.load import load_model

    return load_model(cfg.model, dist.device(cfg.device))


def stage_cache(run: Run, model=None, progress: bool = True, dist: Dist = Dist()) -> dict:
    from patchsae.activations.cache import build_cache
    from patchsae.data import open_dataset

    cfg = run.load_config()
    model = model or _model(cfg, dist)
    ds = open_dataset(cfg.dataset, cfg.train_split, path=cfg.dataset_path)
    return build_cache(model, ds, cfg.layer, run.cache_dir(cfg.train_split), batch_size=cfg.batch_images,
                       max_images=cfg.max_train_images, progress=progress, dist=dist)


def stage_train(run: Run, progress: bool = True, on_the_fly: bool = False, dist: Dist = Dist()):
    """Train on the run's cache, or (on_the_fly) extract activations for every step with no cache. Under
    torchrun (`dist`), every rank trains on its slice of each global batch of the cache."""
    from patchsae.activations.cache import ActivationCache
    from patchsae.activations.tokens import CachedTokens, StreamedTokens
    from patchsae.sae.model import SAEConfig
    from patchsae.sae.train import TrainConfig, train_sae

    cfg = run.load_config()
    if on_the_fly:
        from patchsae.data import open_dataset

        if dist.active:
            raise PatchSAEError("--on-the-fly trains in one process; cache first (`torchrun ... patchsae cache`) "
                                "to train on several")
        model = _model(cfg)
        from patchsae.data.base import FirstN

        ds = FirstN(open_dataset(cfg.dataset, cfg.train_split, path=cfg.dataset_path), cfg.max_train_images)
        source = StreamedTokens(model, ds, cfg.layer, cfg.tokens, seed=cfg.seed)
        d_model, layer = model.d_model, model.resolve_layer(cfg.layer)
    else:
        cache = ActivationCache(run.cache_dir(cfg.train_split))
        source = CachedTokens(cache, cfg.tokens, seed=cfg.seed)
        d_model, layer = cache.d_model, cache.manifest["layer"]
    sae_cfg = SAEConfig(d_model=d_model, d_sae=cfg.expansion * d_model, arch=cfg.arch, k=cfg.k,
                        l1_coeff=cfg.l1_coeff, l0_coeff=cfg.l0_coeff)
    train_cfg = TrainConfig(total_tokens=int(cfg.epochs * source.n_tokens), batch_tokens=cfg.batch_tokens,
                            lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed, device=cfg.device)
    return train_sae(sae_cfg, train_cfg, source, run.sae_dir, progress=progress,
                     provenance={"model": cfg.model, "layer": layer, "tokens": cfg.tokens}, dist=dist)


def stage_evaluate(run: Run, model=None, progress: bool = True) -> dict:
    from patchsae.analysis.evaluate import evaluate, log_density_figure
    from patchsae.data import open_dataset
    from patchsae.sae.checkpoint import load_sae

    cfg = run.load_config()
    model = model or _model(cfg)
    sae, meta = load_sae(run.sae_dir, d_model=model.d_model)
    ds = open_dataset(cfg.dataset, cfg.eval_split, path=cfg.dataset_path)
    metrics, freq_S = evaluate(model, sae, ds, cfg.layer, cfg.batch_images, cfg.max_eval_images, progress)
    metrics["tokens_trained"] = meta.get("tokens_trained")
    write_json(run.path / "eval" / "metrics.json", metrics)
    log_density_figure(freq_S, run.figures_dir / "log_density.png",
                       f"{cfg.model} block {model.resolve_layer(cfg.layer)}, {cfg.dataset}/{cfg.eval_split}")
    return metrics


def write_summary(run: Run, metrics: dict, seconds: float, model) -> dict:
    cfg = run.load_config()
    sae_meta = read_json(run.sae_dir / "config.json")
    summary = {"model": cfg.model, "dataset": cfg.dataset, "layer": model.resolve_layer(cfg.layer),
               "d_model": sae_meta["sae"]["d_model"], "d_sae": sae_meta["sae"]["d_sae"],
               "arch": sae_meta["sae"]["arch"], "tokens_trained": sae_meta["tokens_trained"],
               **{k: metrics[k] for k in SUMMARY_KEYS if k in metrics and k != "tokens_trained"},
               "l0_per_image": metrics["l0_per_image"], "dense_fraction": metrics["dense_fraction"],
               "eval_images": metrics["eval_images"], "seconds": round(seconds, 1)}
    summary = {k: summary[k] for k in (*SUMMARY_KEYS, "l0_per_image", "dense_fraction", "eval_images")}
    write_json(run.path / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    rows = []
    for k, v in summary.items():
        rows.append(f"  {k:<24} {v:.4f}" if isinstance(v, float) else f"  {k:<24} {v}")
    return "\n".join(["PatchSAE summary", *rows])


def quickstart(run: Run, cfg: RunConfig, overrides: dict, progress: bool = True) -> dict:
    t0 = time.time()
    run.init(cfg, overrides)
    cfg = run.load_config()
    model = _model(cfg)
    print(f"[1/3] caching block {model.resolve_layer(cfg.layer)} activations of {cfg.model} on "
          f"{cfg.dataset}/{cfg.train_split}", file=sys.stderr)
    stage_cache(run, model, progress)
    print("[2/3] training the SAE", file=sys.stderr)
    stage_train(run, progress)
    print(f"[3/3] evaluating on {cfg.dataset}/{cfg.eval_split}", file=sys.stderr)
    metrics = stage_evaluate(run, model, progress)
    summary = write_summary(run, metrics, time.time() - t0, model)
    if summary["explained_variance"] is None:
        raise PatchSAEError("evaluation produced no explained variance")
    return summary

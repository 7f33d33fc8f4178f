"""`patchsae quickstart`: cache, train and evaluate in one go (defaults: the embedded model on Fashion-MNIST);
writes DIR/summary.json."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

from patchsae import PatchSAEError
from patchsae.runs import Run, RunConfig
from patchsae.stages import cache, evaluate, train
from patchsae.stages.setup import ConfigOptions, ExtractOptions, dry_run, model_for
from patchsae.stages.train import LogOptions

NAME = "quickstart"
HELP = "cache, train and evaluate in one go (defaults: embedded model on Fashion-MNIST); writes summary.json"
RUN_HELP = "run directory (created if missing)"
OPTIONS = (RunConfig, evaluate.EvaluateOptions, ConfigOptions, LogOptions, ExtractOptions)


@dataclass(frozen=True)
class Summary:
    """DIR/summary.json: the headline numbers of a run, in this order."""

    model: str
    dataset: str
    layer: int
    d_model: int
    d_sae: int
    arch: str
    tokens_trained: int
    mse: float
    explained_variance: float
    l0_per_token: float
    dead_fraction: float
    zero_shot_accuracy: float
    spliced_accuracy: float
    zero_ablated_accuracy: float
    seconds: float
    l0_per_image: float
    dense_fraction: float
    eval_images: int
    table2: dict  # Table 2's metrics (evaluate.TABLE2_KEYS), written as top-level keys after the others

    def to_json(self) -> dict:
        out = asdict(self)
        table2 = out.pop("table2")  # popped first: the dict is built after, so it holds no nested copy
        return {**out, **table2}


SUMMARY_KEYS = tuple(Summary.__dataclass_fields__)[:15]


def write_summary(run: Run, metrics: evaluate.EvalMetrics, seconds: float, model) -> Summary:
    from patchsae.utils import read_json, write_json

    cfg = run.load_config()
    sae_meta = read_json(run.sae_dir / "config.json")
    m = metrics.to_json()
    summary = Summary(model=cfg.model, dataset=cfg.dataset, layer=model.resolve_layer(cfg.layer),
                      d_model=sae_meta["sae"]["d_model"], d_sae=sae_meta["sae"]["d_sae"], arch=sae_meta["sae"]["arch"],
                      tokens_trained=sae_meta["tokens_trained"], seconds=round(seconds, 1),
                      table2={k: m[k] for k in evaluate.TABLE2_KEYS},
                      **{k: m[k] for k in Summary.__dataclass_fields__ if k in m and k != "tokens_trained"})
    write_json(run.summary_file, summary.to_json())
    return summary


def format_summary(summary: Summary) -> str:
    rows = []
    for k, v in summary.to_json().items():
        rows.append(f"  {k:<24} {v:.4f}" if isinstance(v, float) else f"  {k:<24} {v}")
    return "\n".join(["PatchSAE summary", *rows])


def run(run_: Run, cfg: RunConfig, overrides: dict, progress: bool = True, cl_batch_size: int = 128,
        log: str = "none", workers: int = 0) -> Summary:
    t0 = time.time()
    run_.init(cfg, overrides)
    cfg = run_.load_config()
    model = model_for(cfg)
    print(f"[1/3] caching block {model.resolve_layer(cfg.layer)} activations of {cfg.model} on "
          f"{cfg.dataset}/{cfg.train_split}", file=sys.stderr)
    cache.run(run_, model, progress, workers=workers)
    print("[2/3] training the SAE", file=sys.stderr)
    train.run(run_, progress, log=log)
    print(f"[3/3] evaluating on {cfg.dataset}/{cfg.eval_split}", file=sys.stderr)
    first = run_.at(None)  # a multi-layer run (--layers) is summarised at its first block
    metrics = evaluate.run(first, model, progress, cl_batch_size)
    summary = write_summary(first, metrics, time.time() - t0, model)
    if summary.explained_variance is None:
        raise PatchSAEError("evaluation produced no explained variance")
    return summary


def cli(args) -> None:
    from patchsae.cli import given
    from patchsae.runs import start_config
    from patchsae.stages.setup import args_preset, overrides

    if getattr(args, "dry_run", False):
        print(dry_run(args))
        return
    ov = overrides(args)
    opts = evaluate.EvaluateOptions(**given(args, evaluate.EvaluateOptions))
    summary = run(Run(args.run), start_config(ov.get("model"), args_preset(args)), ov,
                  cl_batch_size=opts.cl_batch_size, log=getattr(args, "log", "none"),
                  workers=getattr(args, "workers", 0))
    print(format_summary(summary))
    print(f"wrote {args.run}/summary.json")

"""`patchsae evaluate`: held-out reconstruction metrics and zero-shot accuracy original / SAE-spliced /
zero-ablated; writes DIR/eval/metrics.json and the latent density figure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from patchsae.runs import Run
from patchsae.stages.setup import model_for

NAME = "evaluate"
HELP = ("held-out MSE, explained variance, L0, dead latents, zero-shot accuracy original / SAE-spliced / "
        "zero-ablated")
RUN_HELP = "run directory with a trained SAE"
OPTIONS = ()


@dataclass(frozen=True)
class EvalMetrics:
    """DIR/eval/metrics.json, in this order (analysis/evaluate.py and sae/metrics.py define each number)."""

    mse: float
    explained_variance: float
    l0_per_token: float
    l0_per_image: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    n_tokens: int
    n_images: int
    zero_shot_accuracy: float
    spliced_accuracy: float
    zero_ablated_accuracy: float
    eval_images: int
    eval_skipped: int
    tokens_trained: int | None

    def to_json(self) -> dict:
        return asdict(self)


def run(run: Run, model=None, progress: bool = True) -> EvalMetrics:
    from patchsae.analysis.evaluate import evaluate, log_density_figure
    from patchsae.data import open_dataset
    from patchsae.sae.checkpoint import load_sae
    from patchsae.utils import write_json

    cfg = run.load_config()
    model = model or model_for(cfg)
    sae, meta = load_sae(run.sae_dir, d_model=model.d_model)
    ds = open_dataset(cfg.dataset, cfg.eval_split, path=cfg.dataset_path)
    metrics, freq_S = evaluate(model, sae, ds, cfg.layer, cfg.batch_images, cfg.max_eval_images, progress)
    report = EvalMetrics(**metrics, tokens_trained=meta.get("tokens_trained"))
    write_json(run.eval_metrics_file, report.to_json())
    _track(run, report, meta)
    log_density_figure(freq_S, run.figures_dir / "log_density.png",
                       f"{cfg.model} block {model.resolve_layer(cfg.layer)}, {cfg.dataset}/{cfg.eval_split}")
    return report


def _track(run: Run, report: EvalMetrics, sae_meta: dict) -> None:
    """The metrics as eval/* scalars at the last training step, if `train --log` chose a tracker."""
    from patchsae.stages.train import open_run_tracker

    tracker = open_run_tracker(run)
    if tracker is None:
        return
    batch = (sae_meta.get("train") or {}).get("batch_tokens") or 1
    step = -(-(report.tokens_trained or 0) // batch)
    tracker.log(step, {f"eval/{k}": v for k, v in report.to_json().items()
                       if k not in ("n_tokens", "n_images", "eval_images", "eval_skipped", "tokens_trained",
                                    "dense_threshold")})
    tracker.close()


def cli(args) -> None:
    print(json.dumps(run(Run(args.run)).to_json(), indent=2))

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
    classifier: str = "zero-shot"  # what the accuracies classify with: zero-shot (text head) or probe (DINOv2)

    def to_json(self) -> dict:
        return asdict(self)


def run(run: Run, model=None, progress: bool = True) -> EvalMetrics:
    from patchsae.analysis.evaluate import evaluate, log_density_figure
    from patchsae.analysis.probe import classifier_for
    from patchsae.data import open_dataset
    from patchsae.sae.checkpoint import load_sae
    from patchsae.utils import write_json

    cfg = run.load_config()
    model = model or model_for(cfg)
    sae, meta = load_sae(run.sae_dir, d_model=model.d_model)
    ds = open_dataset(cfg.dataset, cfg.eval_split, path=cfg.dataset_path)
    clf = classifier_for(run, model, ds.class_names, progress=progress)
    metrics, freq_S = evaluate(model, sae, ds, cfg.layer, cfg.batch_images, cfg.max_eval_images, progress, clf)
    report = EvalMetrics(**metrics, tokens_trained=meta.get("tokens_trained"))
    write_json(run.eval_metrics_file, report.to_json())
    log_density_figure(freq_S, run.figures_dir / "log_density.png",
                       f"{cfg.model} block {model.resolve_layer(cfg.layer)}, {cfg.dataset}/{cfg.eval_split}")
    return report


def cli(args) -> None:
    print(json.dumps(run(Run(args.run)).to_json(), indent=2))

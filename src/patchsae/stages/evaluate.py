"""`patchsae evaluate`: held-out reconstruction metrics and zero-shot accuracy original / SAE-spliced /
zero-ablated; writes DIR/eval/metrics.json and the latent density figure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from patchsae.runs import Run
from patchsae.stages.setup import LayerChoice, layer_run, model_for

NAME = "evaluate"
HELP = ("held-out MSE, explained variance, L0, dead latents, zero-shot accuracy original / SAE-spliced / "
        "zero-ablated")
RUN_HELP = "run directory with a trained SAE"
OPTIONS = (LayerChoice,)


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
    log_density_figure(freq_S, run.figures_dir / "log_density.png",
                       f"{cfg.model} block {model.resolve_layer(cfg.layer)}, {cfg.dataset}/{cfg.eval_split}")
    return report


def run_layers(run_: Run, progress: bool = True) -> list[tuple[int, EvalMetrics]]:
    """Every block of a multi-layer run, the model opened once; also written as a table (Run.eval_layers_file)."""
    from patchsae.utils import atomic_path

    views = run_.layer_runs()
    model = model_for(views[0].load_config())
    rows = [(v.layer, run(v, model, progress)) for v in views]
    with atomic_path(run_.eval_layers_file) as tmp:
        tmp.write_text(format_layers(rows) + "\n")
    return rows


def format_layers(rows: list[tuple[int, EvalMetrics]]) -> str:
    """One line per block: explained variance, L0, dead latents, zero-shot accuracy original and spliced."""
    lines = ["| block | explained variance | L0 per token | dead latents | zero-shot accuracy | spliced accuracy |",
             "|---:|---:|---:|---:|---:|---:|"]
    for layer, m in rows:
        lines.append(f"| {layer} | {m.explained_variance:.3f} | {m.l0_per_token:.1f} | {m.dead_fraction:.1%} | "
                     f"{m.zero_shot_accuracy:.3f} | {m.spliced_accuracy:.3f} |")
    return "\n".join(lines)


def cli(args) -> None:
    if getattr(args, "layer", None) is None and Run(args.run).hooked_layers() is not None:
        rows = run_layers(Run(args.run))
        print(format_layers(rows))
        print(f"wrote {Run(args.run).eval_layers_file} and each block's eval/layer<L>/metrics.json")
        return
    print(json.dumps(run(layer_run(args)).to_json(), indent=2))

"""`patchsae evaluate`: held-out reconstruction metrics and zero-shot accuracy original / SAE-spliced /
zero-ablated; writes DIR/eval/metrics.json and the latent density figure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from patchsae.options import opt
from patchsae.runs import Run
from patchsae.stages.setup import LayerChoice, layer_run, model_for

NAME = "evaluate"
HELP = ("held-out MSE, explained variance, L0, dead latents, zero-shot accuracy original / SAE-spliced / "
        "zero-ablated, and Table 2's metrics: normalised MSE, L1, CLIP's contrastive loss with the CLS token "
        "(or every token) spliced or zeroed")
RUN_HELP = "run directory with a trained SAE"


@dataclass(frozen=True)
class EvaluateOptions:
    cl_batch_size: int = opt(128, "images per batch of CLIP's contrastive loss, captioned 'A photo of a {class}' "
                             "(the reference's 128; 0 skips the contrastive losses)")


OPTIONS = (EvaluateOptions, LayerChoice)


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
    # Table 2 (sae/metrics.py): the reference's normalised MSE, L1, L0 and uncentred explained variance
    normalized_mse: float
    l1: float
    l0: float
    explained_variance_uncentred: float
    # CLIP's contrastive loss (analysis/contrastive.py), mean over cl_batches batches of cl_batch_size images;
    # None with --cl-batch-size 0
    contrastive_loss_original: float | None
    contrastive_loss_sae_cls: float | None
    contrastive_loss_zero_cls: float | None
    contrastive_loss_score: float | None
    contrastive_loss_sae_all: float | None
    contrastive_loss_zero_all: float | None
    contrastive_loss_score_all: float | None
    cl_batch_size: int
    cl_batches: int
    tokens_trained: int | None
    classifier: str = "zero-shot"  # what the accuracies classify with: zero-shot (text head) or probe (DINOv2)

    def to_json(self) -> dict:
        return asdict(self)


_FIELDS = tuple(EvalMetrics.__dataclass_fields__)
# the metrics of the paper's Table 2 (and the reference's logs), also copied into summary.json
TABLE2_KEYS = _FIELDS[_FIELDS.index("normalized_mse"): _FIELDS.index("contrastive_loss_score_all") + 1]


def run(run: Run, model=None, progress: bool = True, cl_batch_size: int = 128) -> EvalMetrics:
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
    cl_batch_size = cl_batch_size if model.has_text else 0  # the contrastive loss needs the text tower
    metrics, freq_S = evaluate(model, sae, ds, cfg.layer, cfg.batch_images, cfg.max_eval_images, progress,
                               cl_batch_size, clf, cfg.tokens)
    if not cl_batch_size:
        metrics.update({k: None for k in EvalMetrics.__dataclass_fields__ if k.startswith("contrastive_loss")},
                       cl_batch_size=0, cl_batches=0)
    report = EvalMetrics(**metrics, tokens_trained=meta.get("tokens_trained"))
    log_density_figure(freq_S, run.figures_dir / "log_density.png",
                       f"{cfg.model} block {model.resolve_layer(cfg.layer)}, {cfg.dataset}/{cfg.eval_split}")
    # written after the figure: a metrics file newer than the SAE means the whole evaluation finished (ablate
    # skips such rows; a kill between the two writes leaves no metrics, so the rerun evaluates again)
    write_json(run.eval_metrics_file, report.to_json())
    _track(run, report, meta)
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


def run_layers(run_: Run, progress: bool = True, cl_batch_size: int = 128) -> list[tuple[int, EvalMetrics]]:
    """Every block of a multi-layer run, the model opened once; also written as a table (Run.eval_layers_file)."""
    from patchsae.utils import atomic_path

    views = run_.layer_runs()
    model = model_for(views[0].load_config())
    rows = [(v.layer, run(v, model, progress, cl_batch_size)) for v in views]
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
    from patchsae.cli import given

    opts = EvaluateOptions(**given(args, EvaluateOptions))
    if getattr(args, "layer", None) is None and Run(args.run).hooked_layers() is not None:
        rows = run_layers(Run(args.run), cl_batch_size=opts.cl_batch_size)
        print(format_layers(rows))
        print(f"wrote {Run(args.run).eval_layers_file} and each block's eval/layer<L>/metrics.json")
        return
    print(json.dumps(run(layer_run(args), cl_batch_size=opts.cl_batch_size).to_json(), indent=2))

"""`patchsae classify`: top-k masking (analysis/grid.py). Rank latents on one split (class-level, dataset-level
and random rankings), evaluate the masking grid on another; write DIR/classify/metrics.csv (rows
`selection,mode,k,accuracy,<one column per class>`, accuracies as fractions; random = the mean over seeds),
DIR/classify/manifest.json (last) and DIR/figures/masking_accuracy.png.

Counts come from the cheapest source that holds exactly them: `analyze`'s statistics of the rank split, the run's
activation cache of that split, or a streaming pass.

`--protocol reference` is the paper's Fig 5b protocol (the reference code's masking experiment): rank and evaluate
on one split (the run's training split unless given), a text head that is the plain mean of the normalised
template embeddings (not re-normalised), and every spliced token shifted by a constant (`--splice-shift`: the
reference's -SAE_BIAS by default, or `mean-error`, the mean of x - x_hat on the rank split)."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

from patchsae import PatchSAEError
from patchsae.analysis.rankings import K_GRID
from patchsae.options import opt
from patchsae.runs import Run
from patchsae.stages.setup import LayerChoice, layer_run

PROTOCOLS = ("ours", "reference")
REFERENCE_SHIFT = 0.105131256516992  # the reference code splices SAE_out - SAE_BIAS, SAE_BIAS = -0.105131256516992

NAME = "classify"
HELP = ("top-k masking: accuracy with only the top-k latents kept (or removed), ranked by class / dataset / random; "
        "DIR/classify/metrics.csv and a figure")
RUN_HELP = "run directory with a trained SAE"


@dataclass(frozen=True)
class ClassifyOptions:
    dataset: str | None = opt(None, "dataset to rank and evaluate on (default: the run's own)")
    rank_split: str | None = opt(None, "split whose class-level counts rank the latents (default: the run's "
                                 "training split)")
    eval_split: str | None = opt(None, "split the accuracy is measured on (default: the run's eval split)")
    max_rank_images: int | None = opt(None, "rank on the first N images of the rank split")
    max_eval_images: int | None = opt(None, "evaluate on the first N images of the eval split")
    allow_same_split: bool = opt(False, "allow ranking and evaluating on one split")
    tau: float = opt(0.2, "token activation threshold for class counts")
    seeds: tuple[int, ...] = opt((0, 1, 2), "seeds of the random rankings", cli=False)
    ks: tuple[int | None, ...] = opt(K_GRID, "the k grid (None = all latents)", cli=False)
    batch_size: int = opt(256, "images per forward pass")
    protocol: str = opt("ours", "ours: rank and evaluate on different splits, unit-norm text head, plain splice; "
                        "reference: the paper's Fig 5b protocol (one split, the run's training split unless given; "
                        "text head not re-normalised; every spliced token shifted by --splice-shift)",
                        choices=PROTOCOLS)
    splice_shift: str | None = opt(None, "constant added to every coordinate of every spliced token: a number, or "
                                   "mean-error (the mean of x - x_hat on the rank split); default "
                                   f"{REFERENCE_SHIFT} under --protocol reference, 0 under ours",
                                   metavar="X|mean-error")


OPTIONS = (ClassifyOptions, LayerChoice)


@dataclass(frozen=True)
class ClassifyReport:
    manifest: dict  # DIR/classify/manifest.json as written
    rows: list[dict]  # metrics.csv's rows with per-class accuracies (and each random seed's accuracy)


def rank_counts(run: Run, model, sae, ds, layer: int, opts: ClassifyOptions, progress: bool = True):
    """(counts_CS, provenance) for the rank split, from the cheapest source that holds exactly them."""
    from patchsae.analysis.counts import counts_from_cache, counts_from_stream
    from patchsae.runs.artefacts import cache_covering, read_analysis

    ident = {"dataset": ds.name, "split": ds.split, "model": model.name, "layer": layer}
    analysis = read_analysis(run, sae.cfg.d_sae, {**ident, "tau": opts.tau, "max_images": opts.max_rank_images})
    if analysis is not None:
        return analysis.tensors["class_counts_CS"], {"source": str(run.analysis_dir),
                                                     "images": analysis.manifest["n_images"]}
    cache = cache_covering(run, ds.split, ident, opts.max_rank_images, len(ds.class_names))
    if cache is not None:
        if progress:
            print(f"class-level counts from the activation cache {cache.folder}", file=sys.stderr)
        counts_CS, n = counts_from_cache(cache, sae, len(ds.class_names), opts.tau, opts.max_rank_images)
        return counts_CS, {"source": str(cache.folder), "images": n}
    counts_CS, n = counts_from_stream(model, sae, ds, layer, opts.tau, opts.max_rank_images, opts.batch_size,
                                      progress)
    return counts_CS, {"source": f"stream {ds.name}/{ds.split}", "images": n}


def splits(opts: ClassifyOptions, cfg) -> tuple[str, str]:
    """(rank split, eval split): different splits under ours; one split under the reference protocol."""
    if opts.protocol not in PROTOCOLS:
        raise PatchSAEError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {opts.protocol!r}")
    if opts.protocol == "ours":
        return opts.rank_split or cfg.train_split, opts.eval_split or cfg.eval_split
    if opts.rank_split and opts.eval_split and opts.rank_split != opts.eval_split:
        raise PatchSAEError(f"--protocol reference ranks and evaluates on one split; got --rank-split "
                            f"{opts.rank_split!r} and --eval-split {opts.eval_split!r}")
    split = opts.rank_split or opts.eval_split or cfg.train_split
    return split, split


def splice_shift(opts: ClassifyOptions, model, sae, ds_rank, layer: int, progress: bool) -> dict:
    """{"value": the constant added to spliced tokens, "source": where it came from (and images measured)}."""
    from patchsae.analysis.grid import mean_error

    given = opts.splice_shift
    if given is None:
        value = REFERENCE_SHIFT if opts.protocol == "reference" else 0.0
        return {"value": value, "source": f"default of --protocol {opts.protocol}"}
    if given == "mean-error":
        value, n = mean_error(model, sae, ds_rank, layer, opts.max_rank_images, opts.batch_size, progress)
        return {"value": value, "source": f"mean of x - x_hat on {ds_rank.name}/{ds_rank.split}", "images": n}
    try:
        value = float(given)
    except ValueError:
        raise PatchSAEError(f"--splice-shift must be a number or mean-error, not {given!r}") from None
    if value != value or abs(value) == float("inf"):
        raise PatchSAEError(f"--splice-shift must be finite, not {given!r}")
    return {"value": value, "source": "--splice-shift"}


def run(run: Run, opts: ClassifyOptions = ClassifyOptions(), progress: bool = True) -> ClassifyReport:
    """Rank latents on one split, evaluate the masking grid on another; write DIR/classify and the figure."""
    from patchsae.analysis.figures import masking_figure
    from patchsae.analysis.grid import classify_grid, metrics_csv, result_rows
    from patchsae.data import open_dataset
    from patchsae.analysis.probe import classifier_for
    from patchsae.models.classifier import TextClassifier
    from patchsae.models.text_head import cached_text_head
    from patchsae.runs.artefacts import open_run
    from patchsae.utils import atomic_path, write_json

    t0 = time.time()
    cfg = run.load_config()
    dataset = opts.dataset or cfg.dataset
    rank_split, eval_split = splits(opts, cfg)
    if rank_split == eval_split and not opts.allow_same_split and opts.protocol == "ours":
        raise PatchSAEError(f"latents would be ranked and evaluated on the same split {eval_split!r}; choose "
                            "different --rank-split/--eval-split or pass --allow-same-split")
    for name, n in (("--max-rank-images", opts.max_rank_images), ("--max-eval-images", opts.max_eval_images)):
        if n is not None and n < 1:
            raise PatchSAEError(f"{name} must be at least 1, not {n}")
    if opts.splice_shift not in (None, "mean-error"):
        splice_shift(opts, None, None, None, 0, False)  # a bad number fails before any model loads
    cfg, model, sae, layer = open_run(run)
    path = None if opts.dataset else cfg.dataset_path  # the run's local copy, if it has one
    ds_eval = open_dataset(dataset, eval_split, **({"path": path} if path else {}))
    ds_rank = open_dataset(dataset, rank_split, **({"path": path} if path else {}))
    if list(ds_rank.class_names) != list(ds_eval.class_names):
        raise PatchSAEError(f"{dataset}: splits {rank_split!r} and {eval_split!r} have different classes")
    reference = opts.protocol == "reference"
    if reference and model.has_text:  # the reference's head: the mean of normalised template embeddings, as is
        clf = TextClassifier(model, cached_text_head(model, ds_eval.class_names, run.text_head_file,
                                                     renormalise=False))
    else:
        clf = classifier_for(run, model, ds_eval.class_names, progress=progress)
    counts_CS, rank_info = rank_counts(run, model, sae, ds_rank, layer, opts, progress)
    shift = splice_shift(opts, model, sae, ds_rank, layer, progress)
    t_rank = time.time() - t0
    tally, info = classify_grid(model, sae, ds_eval, layer, clf, counts_CS, opts.ks, opts.seeds,
                                opts.max_eval_images, opts.batch_size, progress, shift["value"])
    rows = result_rows(tally, info["ks"], opts.seeds)
    with atomic_path(run.classify_dir / "metrics.csv") as tmp:
        tmp.write_text(metrics_csv(rows, ds_eval.class_names))
    title = (f"{model.name} block {layer}, SAE {sae.cfg.d_sae} latents\nranked on {ds_rank.name}/{rank_split} "
             f"({rank_info['images']} images), evaluated on {eval_split} ({info['images']} images)")
    masking_figure(run.figures_dir / "masking_accuracy.png", rows, title)
    manifest = {"format": "patchsae-classify/1", "protocol": opts.protocol, "text_head_renormalised": not reference,
                "splice_shift": shift, "dataset": ds_eval.name, "rank_split": rank_split,
                "eval_split": eval_split, "rank_images": rank_info["images"], "rank_source": rank_info["source"],
                "eval_images": info["images"], "eval_skipped": info["skipped"], "model": model.name,
                "layer": layer, "d_sae": sae.cfg.d_sae, "ks": info["ks"], "class_names": list(ds_eval.class_names),
                "templates": len(model.templates), "classifier": clf.kind, "fast_last_block": info["fast_last_block"],
                "random_seed_accuracies": {f"{r['mode']} {r['k']}": r["seed_accuracies"]
                                           for r in rows if r["selection"] == "random"},
                "options": {**asdict(opts), "ks": [k for k in opts.ks]},
                "seconds": {"rank": round(t_rank, 1), "grid": info["seconds"], "total": round(time.time() - t0, 1)}}
    write_json(run.classify_dir / "manifest.json", manifest)
    return ClassifyReport(manifest, rows)


def format_report(report: ClassifyReport) -> str:
    from patchsae.analysis.grid import format_table

    m = report.manifest
    return "\n".join([
        f"top-k masking on {m['dataset']}/{m['eval_split']} ({m['eval_images']} images), latents "
        f"ranked on {m['rank_split']} ({m['rank_images']} images, {m['rank_source']})",
        f"protocol {m['protocol']}: text head {'' if m['text_head_renormalised'] else 'not '}re-normalised, "
        f"splice shift {m['splice_shift']['value']:.6g} ({m['splice_shift']['source']})",
        format_table(report.rows, m["d_sae"]),
        f"seconds: {m['seconds']}",
    ])


def cli(args) -> None:
    from patchsae.cli import given

    run_ = layer_run(args)
    print(format_report(run(run_, ClassifyOptions(**given(args, ClassifyOptions)))))
    print(f"wrote {run_.classify_dir / 'metrics.csv'} and {run_.figures_dir / 'masking_accuracy.png'}")

"""`patchsae` command line: one subcommand per stage, and `quickstart` that chains them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from dataclasses import fields

from patchsae import PatchSAEError
from patchsae.run import EMBEDDED_DEFAULTS, Run, RunConfig

_HELP = {
    "model": "CLIP to open: 'embedded' (default), a local Hugging Face CLIP folder, a hub id such as "
             "openai/clip-vit-base-patch16, or an OpenAI-layout .pt/.safetensors file (see `patchsae models`)",
    "dataset": "'fashion-mnist', 'digits' (scikit-learn's 8x8 digits), a name from `patchsae datasets` (e.g. "
               "eurosat), a folder of class subfolders, a datasets save_to_disk folder, or hf:NAME",
    "dataset_path": "local copy of a `patchsae datasets` entry (a save_to_disk folder or an image folder); "
                    "used instead of the Hugging Face hub",
    "train_split": "split whose activations are cached and trained on",
    "eval_split": "held-out split for evaluation",
    "layer": "block whose output (residual stream) is hooked; negative counts from the end (-2 = paper)",
    "tokens": "tokens to train on: all (CLS + patches, the paper), patch, or cls",
    "max_train_images": "cache only the first N training images",
    "max_eval_images": "evaluate on the first N held-out images",
    "arch": "relu (paper: ReLU + L1, ghost grads), topk (TopK + AuxK), batchtopk (BatchTopK + AuxK; runs as "
            "JumpReLU with the learnt threshold afterwards) or jumprelu (JumpReLU + L0 penalty, --l0-coeff)",
    "expansion": "d_sae = expansion x d_model (paper: 64)",
    "k": "active latents per token for topk",
    "l1_coeff": "L1 coefficient lambda for relu (paper: 8e-5)",
    "l0_coeff": "L0 penalty coefficient for jumprelu",
    "lr": "Adam learning rate (paper: 4e-4)",
    "warmup_steps": "linear warm-up steps (paper: 500)",
    "batch_tokens": "tokens per training step",
    "epochs": "passes over the cached tokens",
    "seed": "random seed (initialisation and token order)",
    "device": "cpu or cuda",
    "batch_images": "images per forward pass when extracting",
}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (created if missing)")
    for f in fields(RunConfig):
        typ = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], None)
        if f.name.startswith("max_"):
            typ = int
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=typ or str, default=None,
                       help=_HELP.get(f.name, ""))


def _overrides(args) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}


def _base(args) -> RunConfig:
    model = getattr(args, "model", None) or "embedded"
    return RunConfig(**EMBEDDED_DEFAULTS) if model == "embedded" else RunConfig()


def _start(args) -> RunConfig:
    """The config a new run starts from: a named preset, or the defaults for the chosen model."""
    if getattr(args, "preset", None):
        from patchsae.preset import preset_config

        return preset_config(args.preset)
    return _base(args)


def _dry_run(args) -> None:
    """Print the resolved config and its budget; writes nothing, loads no model and touches no network."""
    from dataclasses import replace

    from patchsae.preset import budget, format_dry_run

    run = Run(args.run)
    cfg = run.load_config() if run.has_results() else replace(_start(args), **_overrides(args))
    print(format_dry_run(cfg, budget(cfg)))


def _init_run(args):
    """Create or check the run's config; under torchrun (several ranks), rank 0 does it while the others wait.
    Returns (run, dist)."""
    from patchsae.dist import Dist

    run = Run(args.run)
    device = _overrides(args).get("device") or (run.load_config().device if run.config_file.exists()
                                                 else _start(args).device)
    dist = Dist.from_env(device)
    if dist.is_main:
        run.init(_start(args), _overrides(args))
    dist.barrier()
    return run, dist


def cmd_cache(args):
    from patchsae.pipeline import stage_cache

    if args.dry_run:
        return _dry_run(args)
    run, dist = _init_run(args)
    m = stage_cache(run, dist=dist)
    if not dist.is_main:
        return
    print(f"cached {m['n_images']} images x {m['n_tokens_per_image']} tokens x {m['d_model']} "
          f"(block {m['layer']}) in {run.cache_dir(m['split'])}")


def cmd_train(args):
    from patchsae.pipeline import stage_train

    if args.dry_run:
        return _dry_run(args)
    run, dist = _init_run(args)
    sae = stage_train(run, on_the_fly=args.on_the_fly, dist=dist)
    if dist.is_main:
        print(f"trained SAE {sae.cfg.d_model} -> {sae.cfg.d_sae} ({sae.cfg.arch}) in {run.sae_dir}")


def cmd_evaluate(args):
    import json

    from patchsae.pipeline import stage_evaluate

    run = Run(args.run)
    print(json.dumps(stage_evaluate(run), indent=2))


def cmd_quickstart(args):
    from patchsae.pipeline import format_summary, quickstart

    if args.dry_run:
        return _dry_run(args)
    summary = quickstart(Run(args.run), _start(args), _overrides(args))
    print(format_summary(summary))
    print(f"wrote {args.run}/summary.json")


def cmd_analyze(args):
    from patchsae.analysis.analyze import AnalyzeOptions, format_report, patch_map_report, stage_analyze

    run = Run(args.run)
    if args.image is not None:
        for line in patch_map_report(run, args.image, args.latent, tuple(args.patch) if args.patch else None,
                                     args.dataset, args.split):
            print(line)
        return
    if args.latent is not None or args.patch is not None:
        raise PatchSAEError("--latent and --patch need --image")
    opts = AnalyzeOptions(dataset=args.dataset, split=args.split, max_images=args.max_images, k=args.top_k,
                          tau=args.tau, groups=tuple(args.group or ()), phrases=args.phrases,
                          batch_size=args.batch_size, steer=args.steer)
    report = stage_analyze(run, opts)
    print(format_report(report))
    print(f"wrote {run.path / 'analysis'} and {run.figures_dir}")


def _add_analyze_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory with a trained SAE")
    p.add_argument("--dataset", help="dataset to analyse (default: the run's own); any --dataset spec")
    p.add_argument("--split", help="split to analyse (default: the run's eval split)")
    p.add_argument("--max-images", type=int, help="analyse only the first N images")
    p.add_argument("--top-k", type=int, default=10, help="reference images kept per latent (default 10)")
    p.add_argument("--tau", type=float, default=0.2, help="token activation threshold for class counts (0.2)")
    p.add_argument("--group", nargs="+", metavar="CLASS", help="classes whose counts are summed (group level)")
    p.add_argument("--phrases", help="text file of extra candidate concept names, one per line")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--steer", action="store_true", help="also name latents by steering at the hooked block and "
                   "report that method's agreement (k extra forward passes per latent)")
    p.add_argument("--image", help="patch-map mode: a dataset index or an image file")
    p.add_argument("--latent", type=int, help="latent whose patch map is drawn (default: the top one)")
    p.add_argument("--patch", type=int, nargs=2, metavar=("ROW", "COL"), help="also rank latents of this patch")


MODEL_SOURCES = (
    ("embedded", "the Fashion-MNIST CLIP shipped in this package (default; runs offline)"),
    ("FOLDER", "a local Hugging Face CLIP folder (config.json, weights, tokenizer)"),
    ("HUB_ID", "a Hugging Face hub id such as openai/clip-vit-base-patch16 (needs the hub or a filled cache)"),
    ("FILE.pt|.pth|.bin|.safetensors", "a ViT checkpoint in OpenAI's original layout (also open_clip's "
                                       "OpenAI-style ViTs); CLIP's vocab.json + merges.txt beside it give text"),
)


def cmd_models(args):
    width = max(len(name) for name, _ in MODEL_SOURCES)
    for name, what in MODEL_SOURCES:
        print(f"{name:<{width}}  {what}")


def cmd_datasets(args):
    from patchsae.data.registry import format_table

    print(format_table())


def cmd_classify(args):
    from patchsae.analysis.masking import ClassifyOptions, format_report, stage_classify

    opts = ClassifyOptions(dataset=args.dataset, rank_split=args.rank_split, eval_split=args.eval_split,
                           max_rank_images=args.max_rank_images, max_eval_images=args.max_eval_images,
                           allow_same_split=args.allow_same_split, tau=args.tau, batch_size=args.batch_size)
    run = Run(args.run)
    print(format_report(stage_classify(run, opts)))
    print(f"wrote {run.path / 'classify' / 'metrics.csv'} and {run.figures_dir / 'masking_accuracy.png'}")


def _add_classify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory with a trained SAE")
    p.add_argument("--dataset", help="dataset to rank and evaluate on (default: the run's own)")
    p.add_argument("--rank-split", help="split whose class-level counts rank the latents (default: the run's "
                   "training split)")
    p.add_argument("--eval-split", help="split the accuracy is measured on (default: the run's eval split)")
    p.add_argument("--max-rank-images", type=int, help="rank on the first N images of the rank split")
    p.add_argument("--max-eval-images", type=int, help="evaluate on the first N images of the eval split")
    p.add_argument("--allow-same-split", action="store_true", help="allow ranking and evaluating on one split")
    p.add_argument("--tau", type=float, default=0.2, help="token activation threshold for class counts (0.2)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256)")


def _open_explorer(args):
    """The run opened for exploring; with --adapted, the adapted model (MaPLe prompts) beside its CLIP."""
    from patchsae.explorer.session import Explorer
    from patchsae.run import Run

    adapt = None
    if getattr(args, "adapted", None):
        from patchsae.models.maple import load_adapted

        adapt = lambda clip: load_adapted(clip, args.adapted)  # noqa: E731
    return Explorer(Run(args.run), adapt)


def cmd_serve(args):
    from patchsae.explorer.server import check_listen, serve

    if args.max_upload_mb <= 0:
        raise PatchSAEError(f"--max-upload-mb must be positive, not {args.max_upload_mb}")
    check_listen(args.host, args.port)
    explorer = _open_explorer(args)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"patchsae explorer for {args.run} on http://{host}:{args.port}/  (Ctrl-C stops it)", flush=True)
    serve(explorer, args.host, args.port, int(args.max_upload_mb * 2**20))


def cmd_report(args):
    from patchsae.explorer.report import write_report

    if args.top < 1 or args.class_top < 0:
        raise PatchSAEError(f"--top must be at least 1 and --class-top at least 0, not {args.top}, {args.class_top}")
    info = write_report(_open_explorer(args), args.out, args.top, args.class_top)
    print(f"wrote {info['latent_pages']} latent pages, {info['class_pages']} class pages and "
          f"{info['images']} images to {args.out}; open {info['index']}")


def _add_explorer_options(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--run", required=True, help="run directory with a trained SAE and `patchsae analyze` output")
    p.add_argument("--adapted", metavar="PROMPTS", help="learnt MaPLe prompts: also show the adapted model, "
                   "read by the same SAE (latents common / base-only / adapted-only)")
    if name == "serve":
        p.add_argument("--port", type=int, default=7860, help="port (7860)")
        p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
        p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MB (10)")
    else:
        p.add_argument("--out", required=True, help="folder for the static site (created; files replaced)")
        p.add_argument("--top", type=int, default=50, help="latents with their own page, most interpretable "
                       "first (50)")
        p.add_argument("--class-top", type=int, default=5, help="each class's top latents by class-level count, "
                       "which get pages too (5)")
def _adapt_overrides(args) -> dict:
    """The MaPLe options given on the command line (the others keep their defaults)."""
    names = ("model", "dataset", "dataset_path", "train_split", "eval_split", "base_classes", "novel_classes",
             "shots", "n_ctx", "depth", "ctx_init", "optimizer", "lr", "epochs", "batch_size", "max_eval_images",
             "device")
    out = {k: getattr(args, k, None) for k in names}
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in out.items() if v is not None}
    return out


def _add_training_options(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--shots", type=int, help=f"training images per base class ({defaults.shots})")
    p.add_argument("--n-ctx", type=int, help=f"context tokens per prompt ({defaults.n_ctx})")
    p.add_argument("--depth", type=int, help="prompt depth J (default: 9 for 12 blocks, round(0.75 x vision "
                   "blocks) otherwise, at most the text blocks)")
    p.add_argument("--ctx-init", help=f"phrase whose first n_ctx tokens initialise the context ({defaults.ctx_init!r})")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help=f"({defaults.optimizer})")
    p.add_argument("--lr", type=float, help="peak learning rate (sgd 0.0035, adamw 0.002), cosine schedule")
    p.add_argument("--epochs", type=int, help=f"epochs over the few-shot images ({defaults.epochs})")
    p.add_argument("--batch-size", type=int, help=f"images per step ({defaults.batch_size})")
    p.add_argument("--max-eval-images", type=int, help="evaluate on the first N images of the base and of the "
                   "novel classes")
    p.add_argument("--device", help="cpu or cuda")


def cmd_adapt(args):
    from patchsae.adapt import AdaptOptions, adapt_seeds, format_adapt, mean_accuracy
    from patchsae.models.load import load_model

    opts = AdaptOptions(**_adapt_overrides(args))
    clip = load_model(opts.model, opts.device)
    reports = adapt_seeds(clip, opts, args.seed or [opts.seed], args.out)
    for r in reports:
        print(format_adapt(r))
        print(f"wrote {r['out']}")
    if len(reports) > 1:
        m = mean_accuracy(reports)
        print("mean over seeds: " + ", ".join(f"{g} {m[g]['zero_shot']:.2f}% -> {m[g]['adapted']:.2f}% "
                                              f"(delta {m[g]['delta']:.2f}%)" for g in m))


def _add_adapt_options(p: argparse.ArgumentParser) -> None:
    from patchsae.adapt import AdaptOptions

    d = AdaptOptions()
    p.add_argument("--out", required=True, help="folder for prompts.safetensors + config.json (OUT/seed<N> for "
                   "several seeds)")
    p.add_argument("--model", help=_HELP["model"])
    p.add_argument("--dataset", help=_HELP["dataset"] + f" (default {d.dataset})")
    p.add_argument("--dataset-path", help=_HELP["dataset_path"])
    p.add_argument("--train-split", help="split the few-shot images come from (train)")
    p.add_argument("--eval-split", help="split base and novel accuracy are measured on (test)")
    p.add_argument("--base-classes", nargs="+", metavar="CLASS", help="names or ids (default: first half)")
    p.add_argument("--novel-classes", nargs="+", metavar="CLASS", help="names or ids (default: all others)")
    p.add_argument("--seed", type=int, nargs="+", help="one prompt set per seed (default 1)")
    _add_training_options(p, d)


def cmd_compare(args):
    from patchsae.analysis.compare import CompareOptions, format_compare, stage_compare

    opts = CompareOptions(dataset=args.dataset, dataset_path=args.dataset_path, split=args.split,
                          rank_split=args.rank_split, max_images=args.max_images,
                          max_rank_images=args.max_rank_images, max_eval_images=args.max_eval_images, tau=args.tau,
                          top_n=args.top_n, low_rank=args.low_rank, examples=tuple(args.examples or ()),
                          masking=not args.no_masking, batch_size=args.batch_size)
    report = stage_compare(Run(args.run), args.adapted, opts)
    print(format_compare(report))
    print(f"wrote {report['out']}")


def _add_compare_options(p: argparse.ArgumentParser) -> None:
    from patchsae.analysis.compare import CompareOptions

    d = CompareOptions()
    p.add_argument("--run", required=True, help="run directory with a trained SAE")
    p.add_argument("--adapted", required=True, help="MaPLe prompts: a folder from `patchsae adapt`, or an official "
                   "MaPLe checkpoint (model.pth.tar-N)")
    p.add_argument("--dataset", help="dataset (default: the one the prompts were trained on)")
    p.add_argument("--dataset-path", help=_HELP["dataset_path"])
    p.add_argument("--split", help="split for counts, groups and masking accuracy (default: the run's eval split)")
    p.add_argument("--rank-split", help="split whose counts rank latents for masking (default: the run's train split)")
    p.add_argument("--max-images", type=int, help="count on the first N images of --split")
    p.add_argument("--max-rank-images", type=int, default=d.max_rank_images, help="(%(default)s)")
    p.add_argument("--max-eval-images", type=int, default=d.max_eval_images, help="masking evaluation images "
                   "(%(default)s)")
    p.add_argument("--tau", type=float, default=d.tau, help="token activation threshold (%(default)s)")
    p.add_argument("--top-n", type=int, default=d.top_n, help="'high' = in the class's top-N latents by count "
                   "(%(default)s)")
    p.add_argument("--low-rank", type=int, help="'low' = ranked at or beyond this, or never counted (2 x top-n)")
    p.add_argument("--examples", nargs="+", metavar="CLASS", help="classes with a scatter figure (default: first "
                   "base and first novel class)")
    p.add_argument("--no-masking", action="store_true", help="skip the masking study")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass (%(default)s)")


def cmd_adapt_study(args):
    from dataclasses import replace

    from patchsae.adapt_study import SCENARIOS, StudyOptions, format_study, stage_adapt_study

    base = StudyOptions()
    opts = StudyOptions(scenarios=tuple(args.scenarios or SCENARIOS), seeds=tuple(args.seed or base.seeds),
                        adapt=replace(base.adapt, **_adapt_overrides(args)), compare=base.compare)
    report = stage_adapt_study(Run(args.run), opts)
    print(format_study(report))
    print(f"wrote {Path(args.run) / 'adapt-study'}")


def _add_study_options(p: argparse.ArgumentParser) -> None:
    from patchsae.adapt_study import SCENARIOS, StudyOptions

    p.add_argument("--run", required=True, help="run directory with an SAE trained on the embedded model")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, help="(default: both)")
    p.add_argument("--seed", type=int, nargs="+", help=f"prompt seeds ({' '.join(map(str, StudyOptions().seeds))})")
    _add_training_options(p, StudyOptions().adapt)


def _add_stage_options(p: argparse.ArgumentParser) -> None:
    """cache / train / quickstart: the run's config fields, plus starting from a preset and a dry run."""
    _add_run_options(p)
    p.add_argument("--preset", choices=["paper"], help="start a new run from a named configuration "
                   "(paper: ViT-B/16, block -2, all tokens, ReLU x64, lambda 8e-5, ImageNet-1k)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and its token, "
                   "memory and step budget; writes nothing and loads no model")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-the-fly", action="store_true",
                   help="extract activations at every step instead of reading the cache")
    _add_stage_options(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="patchsae",
        description="Sparse autoencoders on every token of a CLIP vision transformer (PatchSAE). "
                    "Each stage reads and writes one run directory.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    run_only = lambda p: p.add_argument("--run", required=True, help="run directory with a trained SAE")  # noqa: E731
    no_options = lambda p: None  # noqa: E731
    specs = [  # name, handler, help, options
        ("cache", cmd_cache, "extract the hooked block's activations of the training split into an fp16 cache",
         _add_stage_options),
        ("train", cmd_train, "train the SAE on the cached activations (resumes from its last checkpoint)",
         _add_train_options),
        ("evaluate", cmd_evaluate, "held-out MSE, explained variance, L0, dead latents, zero-shot accuracy "
                                   "original / SAE-spliced / zero-ablated", run_only),
        ("quickstart", cmd_quickstart, "cache, train and evaluate in one go (defaults: embedded model on "
                                       "Fashion-MNIST); writes summary.json", _add_stage_options),
        ("models", cmd_models, "list the model sources that --model accepts", no_options),
        ("datasets", cmd_datasets, "list the named datasets of the paper (--dataset NAME): hub id, splits, classes",
         no_options),
        ("analyze", cmd_analyze, "per-latent statistics, reference images, class counts, concept names and "
                                 "figures (DIR/analysis, DIR/figures); with --image: patch maps of one image",
         _add_analyze_options),
        ("adapt", cmd_adapt, "MaPLe prompt learning: train prompts few-shot on base classes, report base and "
                             "novel accuracy vs zero-shot and the improvement rate delta", _add_adapt_options),
        ("compare", cmd_compare, "CLIP vs a MaPLe-adapted CLIP through the run's SAE: re-used / suppressed / "
                                 "introduced latents per class, count correlation, masking ranking x classifier",
         _add_compare_options),
        ("adapt-study", cmd_adapt_study, "the adaptation study on the embedded model: Fashion-MNIST and digits "
                                         "base-to-novel, MaPLe + compare, the paper's Table 1 layout",
         _add_study_options),
        ("classify", cmd_classify, "top-k masking: accuracy with only the top-k latents kept (or removed), ranked "
                                   "by class / dataset / random; DIR/classify/metrics.csv and a figure",
         _add_classify_options),
        ("serve", cmd_serve, "explore the run's concepts in a browser: top latents of an uploaded image and of "
                             "each patch, heatmaps, statistics, reference images, steering",
         lambda p: _add_explorer_options(p, "serve")),
        ("report", cmd_report, "write the explorer's content for the top latents and the classes as a static "
                               "site (HTML + PNG + JSON, relative links)", lambda p: _add_explorer_options(p, "report")),
    ]
    for name, fn, help_, add_options in specs:
        p = sub.add_parser(name, help=help_, description=help_)
        add_options(p)
        p.set_defaults(fn=fn)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in ("cache", "train"):
            raise PatchSAEError(f"`{args.command}` runs in one process; under torchrun only `cache` and `train` "
                                "are distributed")
        args.fn(args)
    except PatchSAEError as exc:
        print(f"patchsae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchsae: interrupted; rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

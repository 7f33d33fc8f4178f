"""`patchsae` command line: one subcommand per stage, and `quickstart` that chains them."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from patchsae import PatchSAEError
from patchsae.run import EMBEDDED_DEFAULTS, Run, RunConfig

_HELP = {
    "model": "CLIP to open: 'embedded' (default), a local Hugging Face CLIP folder, a hub id such as "
             "openai/clip-vit-base-patch16, or an OpenAI-layout .pt/.safetensors file (see `patchsae models`)",
    "dataset": "'fashion-mnist', a name from `patchsae datasets` (e.g. eurosat), a folder of class subfolders, "
               "a datasets save_to_disk folder, or hf:NAME",
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="patchsae",
        description="Sparse autoencoders on every token of a CLIP vision transformer (PatchSAE). "
                    "Each stage reads and writes one run directory.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    specs = [
        ("cache", cmd_cache, "extract the hooked block's activations of the training split into an fp16 cache"),
        ("train", cmd_train, "train the SAE on the cached activations (resumes from its last checkpoint)"),
        ("evaluate", cmd_evaluate, "held-out MSE, explained variance, L0, dead latents, zero-shot accuracy "
                                   "original / SAE-spliced / zero-ablated"),
        ("quickstart", cmd_quickstart, "cache, train and evaluate in one go (defaults: embedded model on "
                                       "Fashion-MNIST); writes summary.json"),
        ("models", cmd_models, "list the model sources that --model accepts"),
        ("datasets", cmd_datasets, "list the named datasets of the paper (--dataset NAME): hub id, splits, classes"),
        ("analyze", cmd_analyze, "per-latent statistics, reference images, class counts, concept names and "
                                 "figures (DIR/analysis, DIR/figures); with --image: patch maps of one image"),
        ("classify", cmd_classify, "top-k masking: accuracy with only the top-k latents kept (or removed), ranked "
                                   "by class / dataset / random; DIR/classify/metrics.csv and a figure"),
    ]
    for name, fn, help_ in specs:
        p = sub.add_parser(name, help=help_, description=help_)
        if name == "train":
            p.add_argument("--on-the-fly", action="store_true",
                           help="extract activations at every step instead of reading the cache")
        if name == "evaluate":
            p.add_argument("--run", required=True, help="run directory with a trained SAE")
        elif name == "analyze":
            _add_analyze_options(p)
        elif name == "classify":
            _add_classify_options(p)
        elif name not in ("models", "datasets"):
            _add_run_options(p)
        if name in ("cache", "train", "quickstart"):
            p.add_argument("--preset", choices=["paper"], help="start a new run from a named configuration "
                           "(paper: ViT-B/16, block -2, all tokens, ReLU x64, lambda 8e-5, ImageNet-1k)")
            p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and its token, "
                           "memory and step budget; writes nothing and loads no model")
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

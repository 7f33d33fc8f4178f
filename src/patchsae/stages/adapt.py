"""`patchsae adapt`: train MaPLe prompts few-shot on the base classes of a dataset and measure base and novel accuracy
against the frozen CLIP's zero-shot head (adaptation/prompts.py has the protocol and the recipe).

  OUT/prompts.safetensors   the learnt prompts, under the official code's parameter names
  OUT/config.json           n_ctx, depth, ctx_init, model, dataset, base/novel classes, training options, the
                            few-shot image indices, the training log and the accuracies (written last)
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.options import opt
from patchsae.runs.config import ACT_HELP, DATASET_HELP, DATASET_PATH_HELP, MODEL_HELP

NAME = "adapt"
HELP = ("MaPLe prompt learning: train prompts few-shot on base classes, report base and novel accuracy vs zero-shot "
        "and the improvement rate delta")

# the options `adapt-study` also takes (the study chooses model, dataset and classes itself)
TRAINING = ("shots", "n_ctx", "depth", "ctx_init", "optimizer", "lr", "epochs", "batch_size", "max_eval_images",
            "device")


@dataclass(frozen=True)
class AdaptOptions:
    model: str = opt("embedded", MODEL_HELP, show_default=False)
    act: str | None = opt(None, ACT_HELP, show_default=False, choices=("quick_gelu", "gelu"))
    dataset: str = opt("fashion-mnist", DATASET_HELP)
    dataset_path: str | None = opt(None, DATASET_PATH_HELP)
    train_split: str = opt("train", "split the few-shot images come from")
    eval_split: str = opt("test", "split base and novel accuracy are measured on")
    base_classes: tuple[str, ...] = opt((), "names or ids (default: first half)", metavar="CLASS")
    novel_classes: tuple[str, ...] = opt((), "names or ids (default: all others)", metavar="CLASS")
    shots: int = opt(16, "training images per base class")
    n_ctx: int = opt(2, "context tokens per prompt")
    depth: int | None = opt(None, "prompt depth J (default: 9 for 12 blocks, round(0.75 x vision blocks) otherwise, "
                            "at most the text blocks)")
    ctx_init: str = opt("a photo of a", "phrase whose first n_ctx tokens initialise the context")
    optimizer: str = opt("sgd", "optimizer", choices=("sgd", "adamw"))
    lr: float | None = opt(None, "peak learning rate (sgd 0.0035, adamw 0.002), cosine schedule")
    weight_decay: float = opt(5e-4, "weight decay", cli=False)
    epochs: int = opt(5, "epochs over the few-shot images")
    batch_size: int = opt(4, "images per step")
    warmup_epochs: int = opt(1, "epochs at the constant warm-up learning rate", cli=False)
    warmup_lr: float = opt(1e-5, "warm-up learning rate", cli=False)
    shift: int = opt(2, "augmentation: random shifts of up to this many pixels", cli=False)
    seed: int = opt(1, "seed of the prompt initialisation and the few-shot draw", cli=False)
    max_eval_images: int | None = opt(None, "evaluate on the first N images of the base and of the novel classes")
    eval_batch_size: int = opt(256, "images per evaluation forward pass", cli=False)
    device: str = opt("cpu", "cpu or cuda", show_default=False)

    def recipe(self):
        from patchsae.adaptation.prompts import PromptRecipe

        return PromptRecipe(self.optimizer, self.lr, self.weight_decay, self.epochs, self.batch_size,
                            self.warmup_epochs, self.warmup_lr, self.shift, self.seed)


@dataclass(frozen=True)
class AdaptCommand:
    out: str = opt(help="folder for prompts.safetensors + config.json (OUT/seed<N> for several seeds)", required=True)
    seeds: tuple[int, ...] = opt((), "one prompt set per seed (default 1)", flag="--seed", metavar="SEED",
                               show_default=False)


OPTIONS = (AdaptCommand, AdaptOptions)


@dataclass(frozen=True)
class AdaptReport:
    config: dict  # OUT/config.json as written (its "accuracy" holds base/novel zero-shot, adapted, images, delta)
    out: str
    depth: int
    n_ctx: int
    model: str

    @property
    def accuracy(self) -> dict:
        return self.config["accuracy"]


def adapt(clip, opts: AdaptOptions, out: str | Path, progress: bool = True, zero_shot: dict | None = None
          ) -> AdaptReport:
    """Train prompts on the base classes, evaluate base/novel, save OUT/prompts.safetensors + config.json.
    `zero_shot`: an earlier report's accuracy dict on the same evaluation images, reused for the frozen CLIP."""
    from patchsae.adaptation.prompts import base_novel_accuracies, few_shot_pixels, split_classes, train_prompts
    from patchsae.data import open_dataset
    from patchsae.data.subsets import dataset_labels, few_shot_indices
    from patchsae.models.maple import MapleConfig, build_maple, save_prompts

    t0 = time.time()
    if opts.shots < 1 or opts.epochs < 1 or opts.batch_size < 1:
        raise PatchSAEError("--shots, --epochs and --batch-size must be at least 1")
    kw = {"path": opts.dataset_path} if opts.dataset_path else {}
    ds_train = open_dataset(opts.dataset, opts.train_split, **kw)
    ds_eval = open_dataset(opts.dataset, opts.eval_split, **kw)
    if list(ds_train.class_names) != list(ds_eval.class_names):
        raise PatchSAEError(f"{opts.dataset}: splits {opts.train_split!r} and {opts.eval_split!r} have different "
                            "classes")
    names = list(ds_train.class_names)
    base, novel = split_classes(names, opts.base_classes, opts.novel_classes)
    shots = few_shot_indices(dataset_labels(ds_train), base, opts.shots, opts.seed)
    pixels, labels = few_shot_pixels(clip, ds_train, shots, base)
    maple = build_maple(clip, MapleConfig(opts.n_ctx, opts.depth, opts.ctx_init), seed=opts.seed)
    frozen_before = clip.frozen_fingerprint()
    if progress:
        print(f"MaPLe on {clip.name}: {maple.prompts.n_ctx} context tokens, depth {maple.depth}, "
              f"{sum(p.numel() for p in maple.prompts.parameters()):,} parameters; {len(shots)} training images "
              f"({opts.shots} x {len(base)} base classes)", file=sys.stderr)
    t_train = time.time()
    log = train_prompts(maple, pixels, labels, [names[c] for c in base], opts.recipe(), progress)
    t_train = time.time() - t_train
    if clip.frozen_fingerprint() != frozen_before:
        raise PatchSAEError("internal error: CLIP weights changed during prompt training")
    acc = base_novel_accuracies(clip, maple, ds_eval, base, novel, opts.max_eval_images, opts.eval_batch_size,
                                progress, zero_shot)
    meta = {"dataset": opts.dataset, "dataset_path": opts.dataset_path, "train_split": opts.train_split,
            "eval_split": opts.eval_split, "class_names": names, "base_classes": base, "novel_classes": novel,
            "shots": opts.shots, "seed": opts.seed, "few_shot_indices": shots.tolist(),
            "options": asdict(opts), "train_log": log, "accuracy": acc,
            "seconds": {"train": round(t_train, 1), "total": round(time.time() - t0, 1)}}
    save_prompts(out, maple, meta)
    return AdaptReport(meta, str(out), maple.depth, maple.prompts.n_ctx, clip.name)


def adapt_seeds(clip, opts: AdaptOptions, seeds: list[int], out: str | Path, progress: bool = True
                ) -> list[AdaptReport]:
    """`adapt` once per seed: OUT itself for one seed, OUT/seed<N> for several."""
    if len(seeds) == 1:
        return [adapt(clip, replace(opts, seed=seeds[0]), out, progress)]
    reports = [adapt(clip, replace(opts, seed=seeds[0]), Path(out) / f"seed{seeds[0]}", progress)]
    for s in seeds[1:]:  # the frozen CLIP's accuracy does not depend on the seed: measured once
        reports.append(adapt(clip, replace(opts, seed=s), Path(out) / f"seed{s}", progress, reports[0].accuracy))
    return reports


def format_adapt(report: AdaptReport) -> str:
    c = report.config
    lines = [f"MaPLe prompts ({report.n_ctx} tokens, depth {report.depth}) on {report.model}, "
             f"{c['dataset']}: {c['shots']} shots x {len(c['base_classes'])} base classes, "
             f"seed {c['seed']}, {c['seconds']['train']} s training",
             f"{'classes':<8}{'zero-shot':>11}{'MaPLe':>9}{'delta':>9}{'images':>8}"]
    for group in ("base", "novel"):
        a = report.accuracy.get(group)
        if a:
            lines.append(f"{group:<8}{a['zero_shot']:>10.2f}%{a['adapted']:>8.2f}%{a['delta']:>8.2f}%"
                         f"{a['images']:>8}")
    lines.append("delta = (MaPLe - zero-shot) / (100 - zero-shot)")
    return "\n".join(lines)


def cli(args) -> None:
    from patchsae.adaptation.prompts import mean_accuracy
    from patchsae.cli import given
    from patchsae.models.load import load_model

    cmd = AdaptCommand(**given(args, AdaptCommand))
    opts = AdaptOptions(**given(args, AdaptOptions))
    clip = load_model(opts.model, opts.device, act=opts.act)
    reports = adapt_seeds(clip, opts, list(cmd.seeds) or [opts.seed], cmd.out)
    for r in reports:
        print(format_adapt(r))
        print(f"wrote {r.out}")
    if len(reports) > 1:
        m = mean_accuracy([r.accuracy for r in reports])
        print("mean over seeds: " + ", ".join(f"{g} {m[g]['zero_shot']:.2f}% -> {m[g]['adapted']:.2f}% "
                                              f"(delta {m[g]['delta']:.2f}%)" for g in m))

"""The `adapt` stage: train MaPLe prompts few-shot on the base classes of a dataset and measure base and novel
accuracy against the frozen CLIP's zero-shot head (MaPLe's base-to-novel protocol).

  OUT/prompts.safetensors   the learnt prompts, under the official code's parameter names
  OUT/config.json           n_ctx, depth, ctx_init, model, dataset, base/novel classes, training options, the
                            few-shot image indices, the training log and the accuracies (written last)

Protocol: `shots` training images per base class (seeded draw); base accuracy = the base classes' eval-split
images classified among the base classes only, novel accuracy likewise among the novel classes (the two heads
never compete). Zero-shot = the frozen CLIP with its own prompt ensemble (`ClipModel.text_head`); adapted = the
MaPLe model with its learnt context. delta = (adapted - zero-shot) / (100 - zero-shot), on the base classes, in %.

Training (defaults = the official base-to-novel recipe, vit_b16_c2_ep5_batch4_2ctx): SGD, momentum 0.9, weight
decay 5e-4, lr 0.0035, batch 4, 5 epochs, the first epoch at a constant 1e-5 (warm-up), then cosine to 0;
cross-entropy of CLIP's scaled cosine logits over the base classes. Augmentation: random shifts of up to
`shift` pixels (edges replicated); no flips, which would change digits.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from patchsae import PatchSAEError
from patchsae.data.base import LabelledImages, SkipLog, iter_batches
from patchsae.models.clip import ClipModel
from patchsae.models.maple import MapleConfig, MapleModel, build_maple, save_prompts


@dataclass(frozen=True)
class AdaptOptions:
    model: str = "embedded"
    dataset: str = "fashion-mnist"
    dataset_path: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    base_classes: tuple[str, ...] = ()  # names or ids; default: the first ceil(n/2) classes
    novel_classes: tuple[str, ...] = ()  # default: all other classes
    shots: int = 16
    n_ctx: int = 2
    depth: int | None = None  # default: models.maple.default_depth
    ctx_init: str = "a photo of a"
    optimizer: str = "sgd"  # sgd | adamw
    lr: float | None = None  # default: 0.0035 (sgd), 0.002 (adamw)
    weight_decay: float = 5e-4
    epochs: int = 5
    batch_size: int = 4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    shift: int = 2
    seed: int = 1
    max_eval_images: int | None = None  # per group (base, novel)
    eval_batch_size: int = 256
    device: str = "cpu"

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"sgd": 0.0035, "adamw": 0.002}[self.optimizer]


def improvement_rate(adapted: float, zero_shot: float) -> float:
    """The paper's delta, in %: (adapted - zero-shot) / (100 - zero-shot), both accuracies in %."""
    if zero_shot >= 100.0:
        return 0.0 if adapted >= 100.0 else -math.inf
    return 100.0 * (adapted - zero_shot) / (100.0 - zero_shot)


def split_classes(class_names, base: tuple[str, ...], novel: tuple[str, ...]) -> tuple[list[int], list[int]]:
    from patchsae.data.registry import base_novel_split
    from patchsae.data.subsets import resolve_class_list

    n = len(class_names)
    b = resolve_class_list(base, class_names, "--base-classes") if base else base_novel_split(n)[0]
    if novel:
        nv = resolve_class_list(novel, class_names, "--novel-classes")
    else:
        nv = [c for c in range(n) if c not in b]
    if set(b) & set(nv):
        raise PatchSAEError(f"classes {sorted(set(b) & set(nv))} are both base and novel")
    if not b:
        raise PatchSAEError("no base classes")
    return b, nv


# ---- training -----------------------------------------------------------------------------------------------

def _shift(x_BCHW: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to max_shift pixels per image (edge pixels replicated)."""
    if max_shift <= 0:
        return x_BCHW
    B, _, H, W = x_BCHW.shape
    padded = F.pad(x_BCHW, (max_shift,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, B), generator=gen)).tolist()
    return torch.stack([padded[b, :, dy[b]: dy[b] + H, dx[b]: dx[b] + W] for b in range(B)])


def lr_at(step: int, steps_per_epoch: int, total: int, opts: AdaptOptions) -> float:
    warm = opts.warmup_epochs * steps_per_epoch
    if step < warm:
        return opts.warmup_lr
    t = (step - warm) / max(total - warm, 1)
    return 0.5 * opts.learning_rate() * (1 + math.cos(math.pi * t))


def train_prompts(model: MapleModel, pixels_NCHW: torch.Tensor, labels_N: torch.Tensor, class_names,
                  opts: AdaptOptions, progress: bool = True) -> list[dict]:
    """Train `model.prompts` in place on the few-shot images (labels index `class_names`); CLIP stays frozen.
    Returns one log row per epoch (mean loss, training accuracy, learning rate)."""
    params = list(model.prompts.parameters())
    if opts.optimizer == "sgd":
        optim = torch.optim.SGD(params, lr=opts.learning_rate(), momentum=0.9, weight_decay=opts.weight_decay)
    elif opts.optimizer == "adamw":
        optim = torch.optim.AdamW(params, lr=opts.learning_rate(), weight_decay=opts.weight_decay)
    else:
        raise PatchSAEError(f"--optimizer must be sgd or adamw, not {opts.optimizer!r}")
    gen = torch.Generator().manual_seed(opts.seed)
    N = len(labels_N)
    per_epoch = math.ceil(N / opts.batch_size)
    total = per_epoch * opts.epochs
    scale = min(model.logit_scale, 100.0)
    model.prompts.train()
    log, step = [], 0
    for epoch in range(opts.epochs):
        order = torch.randperm(N, generator=gen)
        loss_sum, correct = 0.0, 0
        for s in range(0, N, opts.batch_size):
            idx = order[s: s + opts.batch_size]
            for g in optim.param_groups:
                g["lr"] = lr_at(step, per_epoch, total, opts)
            x = _shift(pixels_NCHW[idx], opts.shift, gen).to(model.device)
            y = labels_N[idx].to(model.device)
            text_CE = F.normalize(model.encode_text(list(class_names)), dim=-1)
            img_BE = F.normalize(model.image_features_grad(x), dim=-1)
            logits = scale * img_BE @ text_CE.T
            loss = F.cross_entropy(logits, y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == y).sum())
            step += 1
        log.append({"epoch": epoch + 1, "loss": loss_sum / N, "train_accuracy": correct / N,
                    "lr": optim.param_groups[0]["lr"]})
        if progress:
            print(f"  epoch {epoch + 1}/{opts.epochs}: loss {loss_sum / N:.4f}, train accuracy "
                  f"{correct / N:.2%}", file=sys.stderr)
    model.prompts.eval()
    return log


# ---- evaluation ---------------------------------------------------------------------------------------------

@torch.no_grad()
def accuracies(models: dict[str, ClipModel], ds: LabelledImages, max_images: int | None = None,
               batch_size: int = 256, progress: str | None = None) -> dict[str, float]:
    """Accuracy (%) of each model on `ds` among ds.class_names (each with its own text head); one pass over the
    images, preprocessed once (all models share the preprocessing of the CLIP they come from)."""
    heads = {k: m.text_head(ds.class_names) for k, m in models.items()}
    pre = next(iter(models.values())).preprocess
    correct, n = {k: 0 for k in models}, 0
    order = range(min(len(ds), max_images)) if max_images else None
    for pixels, labels, _ in iter_batches(ds, pre, batch_size, order, SkipLog(), progress):
        for k, m in models.items():
            pred = m.logits(m.image_features(pixels), heads[k]).argmax(-1).cpu()
            correct[k] += int((pred == labels).sum())
        n += len(labels)
    if n == 0:
        raise PatchSAEError(f"no images to evaluate in {ds.name}/{ds.split}")
    return {k: 100.0 * c / n for k, c in correct.items()} | {"images": n}


def base_novel_accuracies(clip: ClipModel, maple: MapleModel, ds_eval: LabelledImages, base: list[int],
                          novel: list[int], max_images: int | None, batch_size: int, progress: bool,
                          zero_shot: dict | None = None) -> dict:
    """Zero-shot and adapted accuracy (%) on the base and the novel classes, and delta on both. `zero_shot`:
    the frozen CLIP's accuracies from an earlier call on the same images (other seeds), not measured again."""
    from patchsae.data.subsets import ClassSubset, dataset_labels

    labels = dataset_labels(ds_eval)
    out = {}
    for group, classes in (("base", base), ("novel", novel)):
        if not classes:
            continue
        sub = ClassSubset(ds_eval, classes, labels)
        models = {"adapted": maple} if zero_shot else {"zero_shot": clip, "adapted": maple}
        acc = accuracies(models, sub, max_images, batch_size, f"eval {group}" if progress else None)
        if zero_shot:
            acc["zero_shot"] = zero_shot[group]["zero_shot"]
        out[group] = {**acc, "delta": improvement_rate(acc["adapted"], acc["zero_shot"])}
    return out


# ---- the stage ----------------------------------------------------------------------------------------------

def few_shot_pixels(clip: ClipModel, ds: LabelledImages, indices: np.ndarray, classes: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed few-shot images and their labels re-indexed into `classes`."""
    imgs, labels = [], []
    remap = {c: j for j, c in enumerate(classes)}
    for i in indices:
        img, label = ds.load(int(i))
        imgs.append(clip.preprocess.image(img))
        labels.append(remap[int(label)])
    return torch.stack(imgs), torch.tensor(labels)


def adapt(clip: ClipModel, opts: AdaptOptions, out: str | Path, progress: bool = True,
          zero_shot: dict | None = None) -> dict:
    """Train prompts on the base classes, evaluate base/novel, save OUT/prompts.safetensors + config.json.
    `zero_shot`: an earlier report's accuracy dict on the same evaluation images, reused for the frozen CLIP."""
    from patchsae.data import open_dataset
    from patchsae.data.subsets import dataset_labels, few_shot_indices

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
    log = train_prompts(maple, pixels, labels, [names[c] for c in base], opts, progress)
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
    return {**meta, "out": str(out), "depth": maple.depth, "n_ctx": maple.prompts.n_ctx, "model": clip.name}


def format_adapt(report: dict) -> str:
    lines = [f"MaPLe prompts ({report['n_ctx']} tokens, depth {report['depth']}) on {report['model']}, "
             f"{report['dataset']}: {report['shots']} shots x {len(report['base_classes'])} base classes, "
             f"seed {report['seed']}, {report['seconds']['train']} s training",
             f"{'classes':<8}{'zero-shot':>11}{'MaPLe':>9}{'delta':>9}{'images':>8}"]
    for group in ("base", "novel"):
        a = report["accuracy"].get(group)
        if a:
            lines.append(f"{group:<8}{a['zero_shot']:>10.2f}%{a['adapted']:>8.2f}%{a['delta']:>8.2f}%"
                         f"{a['images']:>8}")
    lines.append("delta = (MaPLe - zero-shot) / (100 - zero-shot)")
    return "\n".join(lines)


__all__ = ["AdaptOptions", "adapt", "format_adapt", "improvement_rate", "train_prompts"]


# ---- several seeds, and the two-scenario study ------------------------------------------------------------

def adapt_seeds(clip: ClipModel, opts: AdaptOptions, seeds: list[int], out: str | Path,
                progress: bool = True) -> list[dict]:
    """`adapt` once per seed: OUT itself for one seed, OUT/seed<N> for several."""
    from dataclasses import replace

    if len(seeds) == 1:
        return [adapt(clip, replace(opts, seed=seeds[0]), out, progress)]
    reports = [adapt(clip, replace(opts, seed=seeds[0]), Path(out) / f"seed{seeds[0]}", progress)]
    for s in seeds[1:]:  # the frozen CLIP's accuracy does not depend on the seed: measured once
        reports.append(adapt(clip, replace(opts, seed=s), Path(out) / f"seed{s}", progress, reports[0]["accuracy"]))
    return reports


def mean_accuracy(reports: list[dict]) -> dict:
    """Accuracies and delta averaged over seeds (delta of the averaged accuracies), with the spread."""
    out = {}
    for group in ("base", "novel"):
        rows = [r["accuracy"][group] for r in reports if group in r["accuracy"]]
        if not rows:
            continue
        zs = sum(r["zero_shot"] for r in rows) / len(rows)
        ad = [r["adapted"] for r in rows]
        mean = sum(ad) / len(ad)
        out[group] = {"zero_shot": zs, "adapted": mean, "adapted_min": min(ad), "adapted_max": max(ad),
                      "delta": improvement_rate(mean, zs), "seeds": len(rows)}
    return out

"""The run's linear probe, for models without a text tower (DINOv2): fitted on the final image features (DINOv2:
the layer-normed CLS token) of the run's training split (its first max_train_images images, as the cache), its
accuracy measured on the training images and on the held-out split, and cached in the run (`Run.probe_file`)
keyed by what it was fitted on, so every classification stage reuses it and any change refits it."""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from patchsae import PatchSAEError
from patchsae.data.base import SkipLog, iter_batches
from patchsae.models.classifier import PROBE_L2, Classifier, LinearProbe, TextClassifier, check_classes
from patchsae.runs import Run


@torch.no_grad()
def image_features(model, ds, max_images: int | None, batch_size: int, label: str | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features_NE, labels_N) of the first `max_images` images of `ds` (all if None); unreadable ones skipped."""
    order = range(min(len(ds), max_images)) if max_images else None
    feats, labels = [], []
    for pixels, labels_B, _ in iter_batches(ds, model.preprocess, batch_size, order, SkipLog(), label):
        feats.append(model.image_features(pixels).float().cpu())
        labels.append(labels_B.cpu())
    if not feats:
        raise PatchSAEError(f"no readable images in {ds.name}/{ds.split} to fit or test the linear probe on")
    return torch.cat(feats), torch.cat(labels)


def probe_key(cfg, model, class_names: Sequence[str]) -> dict:
    """What a probe is fitted on: a cached probe with another key is refitted."""
    return {"model": model.name, "dataset": cfg.dataset, "dataset_path": cfg.dataset_path,
            "split": cfg.train_split, "max_images": cfg.max_train_images, "class_names": list(class_names),
            "l2": PROBE_L2}


def accuracy(probe: Classifier, x_NE: torch.Tensor, y_N: torch.Tensor) -> float:
    return float((probe.logits(x_NE).argmax(-1).cpu() == y_N).double().mean())


def fit_probe(run: Run, model, progress: bool = True) -> LinearProbe:
    """Fit the probe on the run's training split, measure it on both splits, write it (atomically) and return it."""
    from patchsae.runs.artefacts import open_run_dataset

    cfg = run.load_config()
    ds_train = open_run_dataset(cfg, None, cfg.train_split)
    ds_eval = open_run_dataset(cfg, None, cfg.eval_split)
    x_NE, y_N = image_features(model, ds_train, cfg.max_train_images, cfg.batch_images,
                               "probe features (train)" if progress else None)
    probe = LinearProbe.fit(x_NE, y_N, len(ds_train.class_names))
    xe_NE, ye_N = image_features(model, ds_eval, cfg.max_eval_images, cfg.batch_images,
                                 "probe features (eval)" if progress else None)
    probe.meta.update(probe_key(cfg, model, ds_train.class_names), train_images=len(y_N), eval_images=len(ye_N),
                      eval_split=cfg.eval_split, train_accuracy=accuracy(probe, x_NE, y_N),
                      eval_accuracy=accuracy(probe, xe_NE, ye_N))
    probe.save(run.probe_file)
    if progress:
        print(f"linear probe on {model.name}'s final features: train accuracy {probe.meta['train_accuracy']:.2%} "
              f"({len(y_N)} images), {cfg.eval_split} accuracy {probe.meta['eval_accuracy']:.2%} ({len(ye_N)} "
              f"images); wrote {run.probe_file}", file=sys.stderr)
    return probe


def run_probe(run: Run, model, refit: bool = False, progress: bool = True) -> LinearProbe:
    """The run's probe: the cached one if it was fitted on what the run says now, else a fresh fit."""
    cfg = run.load_config()
    probe = None if refit else LinearProbe.load(run.probe_file)
    if probe is not None:
        from patchsae.runs.artefacts import open_run_dataset

        want = probe_key(cfg, model, open_run_dataset(cfg, None, cfg.train_split).class_names)
        if all(probe.meta.get(k) == v for k, v in want.items()):
            return probe
    return fit_probe(run, model, progress)


def classifier_for(run: Run, model, class_names: Sequence[str], write: bool = True, progress: bool = True
                   ) -> Classifier:
    """What the run classifies `class_names` with: the model's zero-shot head (cached at the run's text-head
    file) if it has a text tower, else the run's linear probe, fitted now if missing or stale (`write`);
    a reader that must not write (the explorer) gets one clear line instead."""
    from patchsae.models.text_head import cached_text_head

    if model.has_text:
        return TextClassifier(model, cached_text_head(model, class_names, run.text_head_file, write))
    if write:
        probe = run_probe(run, model, progress=progress)
    else:
        probe = LinearProbe.load(run.probe_file)
        if probe is None or probe.meta.get("model") != model.name:
            raise PatchSAEError(f"{model.name} has no text tower and {run.path} has no linear probe yet; run "
                                f"`patchsae probe --run {run.path}` first")
    check_classes(probe, class_names, str(run.probe_file))
    return probe

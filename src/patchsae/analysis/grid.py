"""The top-k masking grid (the paper's section on what latents do to the model's predictions).

For an image, rank the SAE latents (analysis/rankings.py), keep only the top-k ("on") or remove them ("off"),
decode the masked latents and splice the decoding into the hooked block's residual stream at every image token
(CLS + patches; visual prompt tokens, if any, pass through), then finish the forward pass and classify zero-shot
(or, for a model without a text tower, with the run's linear probe: `head` is any `models.classifier.Classifier`,
or a text head tensor).

Rows of a grid (`GridRow`): the baselines `none,original` (unspliced), `none,reconstruction` (all latents kept)
and `none,error_kept` (reconstruction plus the SAE error term: must equal `original`), then
<selection>,on|off,k for each ranking; k is capped at d_sae (k = d_sae is "all": "on" then equals
`reconstruction` and "off" leaves only the decoder bias).

`shift` (the reference protocol's constant, `classify --splice-shift`) is added to every coordinate of every
spliced token of the reconstruction and masked rows; `error_kept` adds the error of that shifted splice, so it
still equals `original`.

Speed: one forward to the hooked block per batch of images serves the whole grid; the SAE code of each token is
kept sparse (analysis/codes.py), so a mask costs one `embedding_bag` over the decoder; and the last block runs for
the CLS query only when the model offers that fast finish.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from patchsae import PatchSAEError
from patchsae.analysis.codes import SparseCodes
from patchsae.analysis.counts import check_counts
from patchsae.analysis.latents import image_rows
from patchsae.analysis.rankings import (SELECTIONS, image_positions, k_values, keep_mask, random_positions,
                                        rank_positions)
from patchsae.data.base import LabelledImages, SkipLog, iter_batches
from patchsae.models.classifier import Classifier, as_classifier
from patchsae.models.clip import ClipModel
from patchsae.sae.model import SAE
from patchsae.utils import csv_text

BASELINES = ("original", "reconstruction", "error_kept")


@dataclass(frozen=True)
class GridRow:
    selection: str  # none, class, dataset, random
    mode: str  # original, reconstruction, error_kept (selection none); on, off
    k: int | None
    variant: int | str | None = None  # a random ranking's seed, or the name of the counts a class ranking used


@dataclass
class Tally:
    """Correct predictions and images per class, per grid row."""

    n_classes: int
    correct: dict = field(default_factory=dict)
    total_C: torch.Tensor | None = None

    def add(self, row: GridRow, pred_B: torch.Tensor, labels_B: torch.Tensor) -> None:
        hit = labels_B[pred_B == labels_B]
        c = torch.bincount(hit.cpu(), minlength=self.n_classes)
        self.correct[row] = self.correct.get(row, 0) + c

    def accuracy(self, row: GridRow) -> tuple[float, list[float]]:
        correct_C = self.correct[row].double()
        per_class = (correct_C / self.total_C.clamp_min(1)).tolist()
        return float(correct_C.sum() / self.total_C.sum().clamp_min(1)), per_class


def grid_rows(ks: Sequence[int], seeds: Sequence[int]) -> list[GridRow]:
    rows = [GridRow("none", m, None) for m in BASELINES]
    for sel in SELECTIONS:
        for s in (seeds if sel == "random" else (None,)):
            rows += [GridRow(sel, mode, k, s) for mode in ("on", "off") for k in ks]
    return rows



def classify_grid(model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, head: Classifier | torch.Tensor,
                  counts_CS: torch.Tensor, ks: Sequence[int | None], seeds: Sequence[int], max_images: int | None,
                  batch_size: int, progress: bool = True, shift: float = 0.0) -> tuple[Tally, dict]:
    """The masking grid of `classify`: class-level, dataset-level and random rankings x on/off x k, plus the
    baselines, evaluated on `ds` (see run_grid)."""
    d_sae = sae.cfg.d_sae
    check_counts(counts_CS, len(ds.class_names), d_sae)
    ks = k_values(d_sae, ks)
    rankings = {("class", None): rank_positions(counts_CS), ("dataset", None): rank_positions(counts_CS.sum(0))}
    rankings.update({("random", s): random_positions(d_sae, s) for s in seeds})
    tally, info = run_grid(model, sae, ds, layer, head, rankings, grid_rows(ks, seeds), max_images, batch_size,
                           progress, shift)
    return tally, {**info, "ks": ks}


@torch.no_grad()
def run_grid(model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, head: Classifier | torch.Tensor,
             rankings: dict[tuple, torch.Tensor], rows: Sequence[GridRow], max_images: int | None,
             batch_size: int, progress: bool = True, shift: float = 0.0) -> tuple[Tally, dict]:
    """Evaluate every grid row on `ds`; one block_output per batch, one cheap finish per row. A masked row
    (selection, mode, k, variant) keeps or removes the top k of rankings[(selection, variant)]; every spliced
    decoding is moved by the constant `shift`."""
    sae = sae.to(model.device).eval()
    clf = as_classifier(model, head)
    C = len(ds.class_names)
    rankings = {key: pos.to(model.device) for key, pos in rankings.items()}
    rows_T, _ = image_rows(model)
    all_rows = bool(rows_T.all())
    tally = Tally(C, total_C=torch.zeros(C, dtype=torch.long))
    order = range(min(len(ds), max_images)) if max_images else None
    skips, finish, fast = SkipLog(), None, False
    n_img, t0 = 0, time.time()
    for pixels, labels, _ in iter_batches(ds, model.preprocess, batch_size, order, skips,
                                          "classify" if progress else None):
        h_BTD = model.block_output(pixels, layer)
        if finish is None:
            finish, fast = model.finisher(layer, h_BTD[:8])
        labels = labels.to(model.device)
        tally.total_C += torch.bincount(labels.cpu(), minlength=C)
        n_img += len(labels)
        _grid_batch(sae, h_BTD, labels, clf, rankings, rows, rows_T, all_rows, finish, tally, shift)
    if n_img == 0:
        raise PatchSAEError(f"no readable images in {ds.name}/{ds.split} ({skips.count} skipped)")
    return tally, {"images": n_img, "skipped": skips.count, "fast_last_block": fast,
                   "seconds": round(time.time() - t0, 1)}


def _grid_batch(sae, h_BTD, labels_B, clf, rankings, rows, rows_T, all_rows, finish, tally, shift: float = 0.0
                ) -> None:
    """All grid rows for one batch of images."""
    codes = SparseCodes(sae, h_BTD[:, rows_T])

    def classify(row: GridRow, x_BID: torch.Tensor) -> None:
        x_BID = x_BID + shift if shift and row.mode != "error_kept" else x_BID
        if all_rows:
            resid_BTD = x_BID
        else:
            resid_BTD = h_BTD.clone()
            resid_BTD[:, rows_T] = x_BID
        tally.add(row, clf.logits(finish(resid_BTD)).argmax(-1), labels_B)

    tally.add(GridRow("none", "original", None), clf.logits(finish(h_BTD)).argmax(-1), labels_B)
    xhat_BID = codes.decode()
    classify(GridRow("none", "reconstruction", None), xhat_BID)
    splice_BID = xhat_BID + shift
    classify(GridRow("none", "error_kept", None), splice_BID + (h_BTD[:, rows_T] - splice_BID))
    entry_pos = {key: codes.positions(image_positions(pos, labels_B)) for key, pos in rankings.items()}
    for row in rows:
        if row.selection != "none":
            pos_BTK = entry_pos[(row.selection, row.variant)]
            classify(row, codes.decode(keep_mask(pos_BTK, row.k, row.mode)))


@torch.no_grad()
def mean_error(model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, max_images: int | None, batch_size: int,
               progress: bool = True) -> tuple[float, int]:
    """(mean of x - x_hat over every coordinate of every image token, images): the constant that a splice shift
    such as the reference's SAE_BIAS estimates (`classify --splice-shift mean-error`)."""
    rows_T, _ = image_rows(model)
    sae = sae.to(model.device).eval()
    total, count, n = 0.0, 0, 0
    order = range(min(len(ds), max_images)) if max_images else None
    for pixels, labels, _ in iter_batches(ds, model.preprocess, batch_size, order, SkipLog(),
                                          "mean error" if progress else None):
        x_BID = model.block_output(pixels, layer)[:, rows_T].float()
        total += float((x_BID - SparseCodes(sae, x_BID).decode()).double().sum())
        count += x_BID.numel()
        n += len(labels)
    if n == 0:
        raise PatchSAEError(f"no readable images in {ds.name}/{ds.split} to measure the mean error")
    return total / count, n


def result_rows(tally: Tally, ks: Sequence[int], seeds: Sequence[int]) -> list[dict]:
    """metrics.csv rows: baselines, then class/dataset/random x on/off x k (random = mean over seeds)."""
    out = []
    for mode in BASELINES:
        acc, per = tally.accuracy(GridRow("none", mode, None))
        out.append({"selection": "none", "mode": mode, "k": None, "accuracy": acc, "per_class": per})
    for sel in SELECTIONS:
        for mode in ("on", "off"):
            for k in ks:
                accs = [tally.accuracy(GridRow(sel, mode, k, s)) for s in (seeds if sel == "random" else (None,))]
                per = torch.tensor([a[1] for a in accs]).mean(0).tolist()
                out.append({"selection": sel, "mode": mode, "k": k, "accuracy": sum(a[0] for a in accs) / len(accs),
                            "per_class": per, "seed_accuracies": [a[0] for a in accs] if sel == "random" else None})
    return out


def metrics_csv(rows: list[dict], class_names: Sequence[str]) -> str:
    return csv_text(["selection", "mode", "k", "accuracy", *class_names],
                    [[r["selection"], r["mode"], "" if r["k"] is None else r["k"], f"{r['accuracy']:.6f}",
                      *(f"{a:.6f}" for a in r["per_class"])] for r in rows])


def format_table(rows: list[dict], d_sae: int) -> str:
    """k down the side, selection x mode across, accuracies in %; baselines above."""
    base = {r["mode"]: r["accuracy"] for r in rows if r["selection"] == "none"}
    lines = [f"original {base['original']:.2%}   reconstruction {base['reconstruction']:.2%}   "
             f"error kept {base['error_kept']:.2%}"]
    cols = [(s, m) for s in SELECTIONS for m in ("on", "off")]
    lines.append(f"{'k':>11}" + "".join(f"{s + ' ' + m:>13}" for s, m in cols))
    grid = {(r["selection"], r["mode"], r["k"]): r["accuracy"] for r in rows if r["selection"] != "none"}
    for k in sorted({r["k"] for r in rows if r["k"] is not None}):
        label = f"{k} (all)" if k == d_sae else str(k)
        lines.append(f"{label:>11}" + "".join(f"{grid[(s, m, k)]:>13.2%}" for s, m in cols))
    return "\n".join(lines)


def masking_pairs(models: dict[str, ClipModel], sae: SAE, ds: LabelledImages, layer: int,
                  rank_counts: dict[str, torch.Tensor], ks: Sequence[int | None], max_images: int | None,
                  batch_size: int, progress: bool) -> list[dict]:
    """Accuracy of class-level top-k masking for each (ranking, classifier) pair: one row per pair, selection
    (class on / class off), k, with overall and per-class accuracy; plus each classifier's baselines."""
    ks = k_values(sae.cfg.d_sae, ks)
    for counts_CS in rank_counts.values():
        check_counts(counts_CS, len(ds.class_names), sae.cfg.d_sae)
    rankings = {("class", name): rank_positions(counts_CS) for name, counts_CS in rank_counts.items()}
    grid = [GridRow("none", m, None) for m in BASELINES]
    grid += [GridRow("class", mode, k, name) for name in rank_counts for mode in ("on", "off") for k in ks]
    rows = []
    for clf, model in models.items():  # one pass over the images per classifier serves every ranking
        tally, info = run_grid(model, sae, ds, layer, model.text_head(ds.class_names), rankings, grid, max_images,
                               batch_size, progress)
        for mode in ("original", "reconstruction"):
            acc, per = tally.accuracy(GridRow("none", mode, None))
            rows.append({"ranking": "", "classifier": clf, "mode": mode, "k": None, "accuracy": acc,
                         "per_class": per})
        for row in grid[len(BASELINES):]:
            acc, per = tally.accuracy(row)
            rows.append({"ranking": row.variant, "classifier": clf, "mode": row.mode, "k": row.k, "accuracy": acc,
                         "per_class": per})
        if progress:
            print(f"masking: classifier {clf}, rankings {', '.join(rank_counts)}: {info['images']} images, "
                  f"{info['seconds']} s (fast last block: {info['fast_last_block']})", file=sys.stderr)
    return rows


"""Class-level counts (the rule is `analysis.latents.add_class_counts`): tokens with activation > tau, counted per
image and summed over the images of each class -> (classes x d_sae). Dataset level = sum over classes.

Here: the count passes of `classify` and
`compare` (from an activation cache, or streaming images through one or several models).
"""

from __future__ import annotations

import numpy as np
import torch

from patchsae import PatchSAEError
from patchsae.analysis.latents import add_class_counts, image_rows
from patchsae.data.base import LabelledImages, SkipLog, iter_batches
from patchsae.models.clip import ClipModel
from patchsae.sae.model import SAE


def check_counts(counts_CS: torch.Tensor, n_classes: int, d_sae: int) -> None:
    if counts_CS.shape != (n_classes, d_sae):
        raise PatchSAEError(f"class-level counts have shape {tuple(counts_CS.shape)}, expected ({n_classes}, "
                            f"{d_sae}): the rank split's classes differ from the evaluated split's")


@torch.no_grad()
def counts_from_cache(cache, sae: SAE, n_classes: int, tau: float, max_images: int | None,
                      chunk: int = 64) -> tuple[torch.Tensor, int]:
    """Class-level counts from an activation cache of the rank split (no model forward): images whose dataset
    index is below `max_images` (all if None). Returns (counts_CS, images)."""
    n = cache.n_images if max_images is None else int(np.searchsorted(cache.index[:, 0], max_images))
    rows_T = torch.tensor([k in ("cls", "patch") for k in cache.kinds])  # as TokenLayout.image_token_mask
    counts_CS = torch.zeros(n_classes, sae.cfg.d_sae, dtype=torch.long)
    for s in range(0, n, chunk):
        h_BTD = torch.from_numpy(cache.images(s, min(s + chunk, n)))[:, rows_T]
        labels_B = torch.from_numpy(cache.index[s: s + len(h_BTD), 1])
        add_class_counts(counts_CS, sae.encode(h_BTD.to(sae.W_dec.device).float()), labels_B, tau)
    return counts_CS, n


@torch.no_grad()
def counts_from_stream(model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, tau: float,
                       max_images: int | None, batch_size: int, progress: bool) -> tuple[torch.Tensor, int]:
    """Class-level counts in one streaming pass over `ds` (the same definition as `analyze`)."""
    rows_T, _ = image_rows(model)
    counts_CS = torch.zeros(len(ds.class_names), sae.cfg.d_sae, dtype=torch.long)
    order = range(min(len(ds), max_images)) if max_images else None
    n = 0
    for pixels, labels, _ in iter_batches(ds, model.preprocess, batch_size, order, SkipLog(),
                                          "rank counts" if progress else None):
        f_BTS = sae.encode(model.block_output(pixels, layer)[:, rows_T].float())
        add_class_counts(counts_CS, f_BTS, labels, tau)
        n += len(labels)
    return counts_CS, n


@torch.no_grad()
def paired_counts(models: dict[str, ClipModel], sae: SAE, ds: LabelledImages, layer: int, tau: float,
                  max_images: int | None, batch_size: int, progress: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """Class-level counts (classes x d_sae) of every model on the same images, one pass (images preprocessed
    once), and the number of images. Keys: the model names for image tokens, and '<name>/prompt' for models
    with visual prompt tokens."""
    C, S = len(ds.class_names), sae.cfg.d_sae
    out: dict[str, torch.Tensor] = {}
    image_rows = {k: m.layout().image_token_mask() for k, m in models.items()}
    for k, rows in image_rows.items():
        out[k] = torch.zeros(C, S, dtype=torch.long)
        if not rows.all():
            out[f"{k}/prompt"] = torch.zeros(C, S, dtype=torch.long)
    pre = next(iter(models.values())).preprocess
    order = range(min(len(ds), max_images)) if max_images else None
    n = 0
    for pixels, labels, _ in iter_batches(ds, pre, batch_size, order, SkipLog(), progress):
        n += len(labels)
        for k, m in models.items():
            f_BTS = sae.encode(m.block_output(pixels, layer).float())
            rows = image_rows[k]
            add_class_counts(out[k], f_BTS[:, rows], labels, tau)
            if f"{k}/prompt" in out:
                add_class_counts(out[f"{k}/prompt"], f_BTS[:, ~rows], labels, tau)
    return out, n


"""Held-out evaluation of a trained SAE inside its CLIP: reconstruction metrics, and zero-shot accuracy of
the original model, with the SAE reconstruction spliced into the tokens it was trained on (the run's token
set; all = CLS and patches), and with that block's output zero-ablated; Table 2's metrics (sae/metrics.py) and
CLIP's contrastive losses with the CLS token or every token spliced (analysis/contrastive.py). One forward to the hooked block per batch serves all. A
model without a text tower (DINOv2) is given its run's linear probe instead: the three accuracies are the probe's
and there are no contrastive losses."""

from __future__ import annotations

from pathlib import Path

import torch

from patchsae.data.base import LabelledImages, SkipLog, iter_batches
from patchsae.analysis.contrastive import ContrastiveBatches
from patchsae.models.backbone import Backbone
from patchsae.models.classifier import Classifier, TextClassifier
from patchsae.sae.metrics import ReconstructionStats
from patchsae.sae.model import SAE


@torch.no_grad()
def evaluate(model: Backbone, sae: SAE, ds: LabelledImages, layer: int, batch_size: int = 256,
             max_images: int | None = None, progress: bool = True, cl_batch_size: int = 128,
             classifier: Classifier | None = None, tokens: str = "all") -> tuple[dict, torch.Tensor]:
    """Return (metrics, per-latent token firing frequency). cl_batch_size: images per contrastive-loss batch
    (0: no contrastive losses); accuracies by `classifier` (default: the model's zero-shot head over the dataset's
    classes). `tokens`: the token set the SAE was trained on (activations/tokens.py); the reconstruction metrics
    are measured on those rows and the spliced accuracy splices those rows, so a CLS-only SAE is judged on CLS
    tokens as the paper's Table 2 does."""
    from patchsae.activations.tokens import token_mask

    sae = sae.to(model.device).eval()
    clf = classifier or TextClassifier(model, model.text_head(ds.class_names))
    stats = ReconstructionStats(sae.cfg.d_model, sae.cfg.d_sae)
    image_rows = token_mask(model.layout().kinds(), tokens)
    correct = {"zero_shot_accuracy": 0, "spliced_accuracy": 0, "zero_ablated_accuracy": 0}
    n = 0
    order = range(min(len(ds), max_images)) if max_images else None
    skips = SkipLog()
    contrastive = ContrastiveBatches(model, sae, ds.class_names, layer, cl_batch_size) if cl_batch_size else None
    for pixels, labels, _ in iter_batches(ds, model.preprocess, batch_size, order, skips,
                                          "evaluate" if progress else None):
        h_BTD = model.block_output(pixels, layer)
        f_BTS = sae.encode(h_BTD)
        xhat_BTD = sae.decode(f_BTS)
        stats.update(h_BTD[:, image_rows], xhat_BTD[:, image_rows], f_BTS[:, image_rows])
        labels = labels.to(model.device)
        spliced_BTD = h_BTD.clone()  # register and prompt tokens, never seen by the SAE, pass through
        spliced_BTD[:, image_rows] = xhat_BTD[:, image_rows]
        features = {name: model.finish_from(resid, layer) for name, resid in (
            ("original", h_BTD), ("sae_all", spliced_BTD), ("zero_all", torch.zeros_like(h_BTD)))}
        if contrastive is not None:  # its every-token losses splice every token, whatever the training set
            contrastive.add(h_BTD, labels, features if tokens == "all" else
                            {k: v for k, v in features.items() if k != "sae_all"})
        for key, name in (("zero_shot_accuracy", "original"), ("spliced_accuracy", "sae_all"),
                          ("zero_ablated_accuracy", "zero_all")):
            pred = clf.logits(features[name]).argmax(-1)
            correct[key] += (pred == labels).sum().item()
        n += len(labels)
    metrics = {**stats.result(), **stats.table2()}
    if contrastive is not None:
        metrics.update(contrastive.result())
    metrics.update({k: v / n for k, v in correct.items()})
    metrics["eval_images"] = n
    metrics["eval_skipped"] = skips.count
    metrics["classifier"] = clf.kind
    return metrics, stats.frequencies()


def log_density_figure(freq_S: torch.Tensor, path: str | Path, title: str) -> None:
    """Histogram of log10 firing frequency per latent; dead latents are counted in the title."""
    from patchsae.analysis.figures import _plt, _save

    plt = _plt()
    alive = freq_S[freq_S > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(alive):
        ax.hist(torch.log10(alive).numpy(), bins=60, color="#3b6ea5")
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    dead = int((freq_S == 0).sum())
    ax.set_title(f"{title}\n{dead} of {len(freq_S)} latents never fired ({dead / max(len(freq_S), 1):.1%})")
    fig.tight_layout()
    _save(fig, path)

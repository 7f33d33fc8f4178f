"""CLIP's own contrastive loss with the hooked block's tokens edited: Table 2's "contrastive loss" columns.

The reference evaluates an SAE by CLIP's training loss on a batch of images and their captions
("A photo of a {class name}"): original, with the hooked block's CLS token replaced by its SAE reconstruction,
and with that token zeroed; score = (CL_sae - CL_orig) / (CL_zero - CL_orig), 0 for a perfect reconstruction,
1 for one no better than zero. We also report the same with every token replaced (or zeroed), the splice our
zero-shot evaluation uses. The loss is HF CLIPModel(return_loss=True)'s: the mean of the two cross-entropies
(texts -> images, images -> texts) of logit_scale * cosine similarity, targets on the diagonal. It depends on the
batch size (the number of candidates), so compare batches of one size (the reference's: 128 images).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from patchsae.models.backbone import Backbone
from patchsae.sae.model import SAE

CAPTION = "A photo of a {}"  # the reference's caption of an image of a class


def captions(class_names: Sequence[str], labels: Sequence[int]) -> list[str]:
    """One caption per image, from its label."""
    return [CAPTION.format(class_names[int(y)]) for y in labels]


def clip_contrastive_loss(image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: float | torch.Tensor
                          ) -> torch.Tensor:
    """CLIP's symmetric contrastive loss of B (image, caption) pairs; embeddings unnormalised, `logit_scale`
    the multiplier (exp of the model's stored log scale). An all-zero embedding counts as uniform (loss
    log B) where HF divides 0 by 0."""
    logits_BB = logit_scale * F.normalize(text_BE.float(), dim=-1) @ F.normalize(image_BE.float(), dim=-1).T
    target_B = torch.arange(len(logits_BB), device=logits_BB.device)
    return (F.cross_entropy(logits_BB, target_B) + F.cross_entropy(logits_BB.T, target_B)) / 2


def contrastive_loss_score(cl_sae: float, cl_orig: float, cl_zero: float) -> float:
    """(CL_sae - CL_orig) / (CL_zero - CL_orig); NaN when zeroing changes nothing."""
    denom = cl_zero - cl_orig
    return (cl_sae - cl_orig) / denom if denom != 0 else float("nan")


@torch.no_grad()
def contrastive_losses(model: Backbone, sae: SAE, pixels_BCHW: torch.Tensor, text_BE: torch.Tensor, layer: int,
                       logit_scale: float | None = None) -> dict[str, float]:
    """Table 2's contrastive losses on one batch: images `pixels_BCHW`, their captions' embeddings `text_BE`
    (model.text_features), the SAE spliced at block `layer`; logit_scale defaults to the model's own. One
    forward to the block serves all five."""
    return losses_from_block(model, sae, model.block_output(pixels_BCHW, layer), text_BE, layer, logit_scale)


@torch.no_grad()
def losses_from_block(model: Backbone, sae: SAE, h_BTD: torch.Tensor, text_BE: torch.Tensor, layer: int,
                      logit_scale: float | None = None, features: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, float]:
    """contrastive_losses from the images' residual stream after block `layer`, h_BTD, already computed.
    `features` may hold image embeddings a caller has already finished: "original", "sae_all", "zero_all"."""
    logit_scale = model.logit_scale if logit_scale is None else logit_scale
    text_BE = text_BE.to(h_BTD.device)
    features = features or {}

    def loss_of(name: str, make_h: Callable[[], torch.Tensor]) -> float:
        image_BE = features[name] if name in features else model.finish_from(make_h(), layer)
        return clip_contrastive_loss(image_BE, text_BE, logit_scale).item()

    def with_cls(row_BD: torch.Tensor) -> torch.Tensor:
        h = h_BTD.clone()
        h[:, 0] = row_BD
        return h

    sae = sae.to(h_BTD.device).eval()
    out = {"contrastive_loss_original": loss_of("original", lambda: h_BTD),
           "contrastive_loss_sae_cls": loss_of("sae_cls", lambda: with_cls(sae(h_BTD[:, 0])[0])),
           "contrastive_loss_zero_cls": loss_of("zero_cls", lambda: with_cls(torch.zeros_like(h_BTD[:, 0]))),
           "contrastive_loss_sae_all": loss_of("sae_all", lambda: sae(h_BTD)[0]),
           "contrastive_loss_zero_all": loss_of("zero_all", lambda: torch.zeros_like(h_BTD))}
    return with_scores(out)


def with_scores(losses: dict[str, float]) -> dict[str, float]:
    """The losses plus the reference's score for the CLS splice and the same score for the all-token splice."""
    orig = losses["contrastive_loss_original"]
    return {**losses,
            "contrastive_loss_score": contrastive_loss_score(losses["contrastive_loss_sae_cls"], orig,
                                                             losses["contrastive_loss_zero_cls"]),
            "contrastive_loss_score_all": contrastive_loss_score(losses["contrastive_loss_sae_all"], orig,
                                                                 losses["contrastive_loss_zero_all"])}


def mean_over_batches(per_batch: Sequence[dict[str, float]]) -> dict[str, float]:
    """Losses averaged over batches (of one size), scores recomputed from the averaged losses."""
    keys = [k for k in per_batch[0] if not k.startswith("contrastive_loss_score")]
    return with_scores({k: sum(b[k] for b in per_batch) / len(per_batch) for k in keys})


class ContrastiveBatches:
    """Table 2's contrastive losses over an evaluation that streams batches of another size: rows of the hooked
    block's output and their labels are collected until `batch_size` images are there, and each full batch is
    scored (a loss depends on the number of candidates, so every batch has the same size). If the images never
    fill one batch, the remainder is scored as one smaller batch, and `result` says so."""

    def __init__(self, model: Backbone, sae: SAE, class_names: Sequence[str], layer: int, batch_size: int = 128):
        self.model, self.sae, self.layer, self.batch_size = model, sae, layer, batch_size
        self.class_text_CE = model.text_features([CAPTION.format(c) for c in class_names])
        self.parts: list[dict[str, torch.Tensor]] = []  # images not scored yet: "h", "y" and any features
        self.per_batch: list[dict[str, float]] = []
        self.sizes: list[int] = []

    def _score(self, part: dict[str, torch.Tensor]) -> None:
        text_BE = self.class_text_CE[part["y"].to(self.class_text_CE.device)]
        features = {k: v for k, v in part.items() if k not in ("h", "y")}
        self.per_batch.append(losses_from_block(self.model, self.sae, part["h"], text_BE, self.layer,
                                                features=features))
        self.sizes.append(len(part["y"]))

    def _pending(self) -> dict[str, torch.Tensor]:
        keys = set.intersection(*(set(p) for p in self.parts))
        return {k: torch.cat([p[k] for p in self.parts]) for k in keys}

    def add(self, h_BTD: torch.Tensor, labels_B: torch.Tensor, features: dict[str, torch.Tensor] | None = None
            ) -> None:
        """Images' block output and labels; `features`: their image embeddings already finished by the caller
        (see losses_from_block), reused instead of running the tower again."""
        self.parts.append({"h": h_BTD, "y": labels_B, **(features or {})})
        while sum(len(p["y"]) for p in self.parts) >= self.batch_size:
            pending, b = self._pending(), self.batch_size
            self._score({k: v[:b] for k, v in pending.items()})
            self.parts = [{k: v[b:] for k, v in pending.items()}]

    def result(self) -> dict:
        """The averaged losses and scores, the batch size used and the number of batches (remainder dropped)."""
        if not self.per_batch and self.parts and len(self._pending()["y"]):
            self._score(self._pending())
        keys = ("contrastive_loss_original", "contrastive_loss_sae_cls", "contrastive_loss_zero_cls",
                "contrastive_loss_score", "contrastive_loss_sae_all", "contrastive_loss_zero_all",
                "contrastive_loss_score_all")
        means = mean_over_batches(self.per_batch) if self.per_batch else dict.fromkeys(keys)
        return {**{k: means[k] for k in keys}, "cl_batch_size": self.sizes[0] if self.sizes else 0,
                "cl_batches": len(self.per_batch)}

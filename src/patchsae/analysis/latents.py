"""Per-latent statistics over a dataset, in one streaming pass (the paper's section on reading latents).

Per latent: activated frequency (fraction of images whose image-level activation, the mean over the image's
CLS + patch tokens, is > 0), mean activation over those images, the top-k reference images by image-level
activation and by the largest single-patch activation, and class-level counts (tokens with activation > tau,
summed over the images of each class), the activation mass per token position (CLS and each patch, summed
over images: where in the image a latent fires) and the number of tokens where it fires. Memory is
O(d_sae x (k + classes + positions)): each batch's candidates are merged into running top-k tables, and no
(images x tokens x d_sae) tensor is ever held. `analysis.kinds` reads latent kinds off these tables.

Label entropy uses the natural log (nats): a latent whose references all share one label has entropy 0, one
spread evenly over 10 classes has ln 10 = 2.30.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchsae import PatchSAEError
from patchsae.data.base import LabelledImages, SkipLog, iter_batches
from patchsae.models.clip import ClipModel
from patchsae.sae.model import SAE

ENCODE_ELEMENTS = 1 << 25  # (images x tokens x d_sae) elements encoded at once: bounds the temporary f_BTS
LOW_ENTROPY = 0.5  # nats; below it a latent's reference images are (nearly) one class


def add_class_counts(counts_CS: torch.Tensor, f_BTS: torch.Tensor, labels_B: torch.Tensor, tau: float) -> None:
    """The paper's class-level count, the one place it is computed: counts_CS[label] += the number of the image's
    tokens with activation > tau (strictly, so a zero never counts, even at tau = 0); in place."""
    counts_BS = (f_BTS > tau).sum(1, dtype=torch.int32)  # int32 sums run ~2x faster than int64 here
    counts_CS.index_add_(0, labels_B.cpu().long(), counts_BS.cpu().long())


class RunningTopK:
    """The k largest values per latent seen so far, with the dataset index and label of each image."""

    def __init__(self, d_sae: int, k: int):
        self.value_SK = torch.full((d_sae, k), -torch.inf)
        self.index_SK = torch.full((d_sae, k), -1, dtype=torch.long)
        self.label_SK = torch.full((d_sae, k), -1, dtype=torch.long)

    def update(self, value_BS: torch.Tensor, index_B: torch.Tensor, label_B: torch.Tensor) -> None:
        """Merge a batch: top-k over the concatenation of the current table and the batch's values."""
        S, B = value_BS.shape[1], value_BS.shape[0]
        value_SX = torch.cat([self.value_SK, value_BS.T.float().cpu()], 1)
        index_SX = torch.cat([self.index_SK, index_B.cpu().long().expand(S, B)], 1)
        label_SX = torch.cat([self.label_SK, label_B.cpu().long().expand(S, B)], 1)
        self.value_SK, pos_SK = value_SX.topk(self.value_SK.shape[1], dim=1)
        self.index_SK = index_SX.gather(1, pos_SK)
        self.label_SK = label_SX.gather(1, pos_SK)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(value, index, label), sorted by value; slots that never held a firing image are (0, -1, -1)."""
        valid_SK = self.value_SK > 0
        return (torch.where(valid_SK, self.value_SK, 0.0), torch.where(valid_SK, self.index_SK, -1),
                torch.where(valid_SK, self.label_SK, -1))


@dataclass(frozen=True)
class LatentStats:
    """The result of a pass; every tensor is finite (latents that never fire have frequency and mean 0)."""

    n_images: int
    fired_S: torch.Tensor  # images whose image-level activation > 0
    frequency_S: torch.Tensor
    mean_act_S: torch.Tensor
    top_value_SK: torch.Tensor  # reference images by image-level activation
    top_index_SK: torch.Tensor
    top_label_SK: torch.Tensor
    patch_value_SK: torch.Tensor  # reference images by their largest patch activation
    patch_index_SK: torch.Tensor
    patch_label_SK: torch.Tensor
    class_counts_CS: torch.Tensor  # tokens with activation > tau, summed over the images of each class
    class_images_C: torch.Tensor  # images of each class seen
    position_mass_ST: torch.Tensor  # activation summed over images at each image token (CLS first, then patches)
    token_fired_S: torch.Tensor  # tokens (over all images and positions) with activation > 0

    @property
    def d_sae(self) -> int:
        return len(self.fired_S)

    @property
    def token_frequency_S(self) -> torch.Tensor:
        """Fraction of all analysed tokens (images x CLS + patch positions) where the latent fires."""
        return (self.token_fired_S / max(self.n_images * self.position_mass_ST.shape[1], 1)).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.__dict__.items() if torch.is_tensor(v)}


class LatentAccumulator:
    """Running sums and top-k tables, updated batch by batch; its size never depends on the image count."""

    def __init__(self, d_sae: int, n_classes: int, n_tokens: int, k: int = 10, tau: float = 0.2):
        """n_tokens: image tokens per image (CLS + patches), the positions of `position_mass_ST`."""
        if k < 1:
            raise PatchSAEError(f"top-k must be at least 1, not {k}")
        self.tau = tau
        self.n_images = 0
        self.fired_S = torch.zeros(d_sae, dtype=torch.long)
        self.sum_S = torch.zeros(d_sae, dtype=torch.float64)
        self.image_top = RunningTopK(d_sae, k)
        self.patch_top = RunningTopK(d_sae, k)
        self.class_counts_CS = torch.zeros(n_classes, d_sae, dtype=torch.long)
        self.class_images_C = torch.zeros(n_classes, dtype=torch.long)
        self.position_mass_TS = torch.zeros(n_tokens, d_sae, dtype=torch.float64)  # (T, S): a batch's sum adds as is
        self.token_fired_S = torch.zeros(d_sae, dtype=torch.long)

    def update(self, f_BTS: torch.Tensor, label_B: torch.Tensor, index_B: torch.Tensor,
               patch_rows_T: torch.Tensor) -> None:
        """f_BTS: latent activations at the image tokens only (CLS + patches, no prompt tokens);
        patch_rows_T marks which of those rows are patches."""
        if f_BTS.shape[1] != self.position_mass_TS.shape[0]:
            raise PatchSAEError(f"codes have {f_BTS.shape[1]} image tokens per image, the accumulator was made "
                                f"for {self.position_mass_TS.shape[0]}")
        img_BS = f_BTS.mean(1)
        fired_BS = img_BS > 0
        self.fired_S += fired_BS.sum(0).cpu()
        self.sum_S += torch.where(fired_BS, img_BS, 0.0).sum(0, dtype=torch.float64).cpu()
        self.image_top.update(img_BS, index_B, label_B)
        self.patch_top.update(f_BTS[:, patch_rows_T].amax(1), index_B, label_B)
        add_class_counts(self.class_counts_CS, f_BTS, label_B, self.tau)
        self.class_images_C += torch.bincount(label_B.cpu().long(), minlength=len(self.class_images_C))
        self.position_mass_TS += f_BTS.sum(0).double().cpu()  # float32 within a batch, float64 across
        self.token_fired_S += (f_BTS > 0).sum((0, 1), dtype=torch.int32).cpu()
        self.n_images += len(label_B)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the accumulator holds (for memory accounting)."""
        tables = [t for top in (self.image_top, self.patch_top) for t in top.__dict__.values()]
        return [self.fired_S, self.sum_S, self.class_counts_CS, self.class_images_C, self.position_mass_TS,
                self.token_fired_S, *tables]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def result(self) -> LatentStats:
        n = max(self.n_images, 1)
        mean_S = self.sum_S / self.fired_S.clamp_min(1)
        return LatentStats(self.n_images, self.fired_S.clone(), (self.fired_S / n).float(), mean_S.float(),
                           *self.image_top.result(), *self.patch_top.result(), self.class_counts_CS.clone(),
                           self.class_images_C.clone(), self.position_mass_TS.T.float().contiguous(),
                           self.token_fired_S.clone())


def image_rows(model: ClipModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the block output that are image tokens, which of those rows are patches)."""
    layout = model.layout()
    kinds = [k for k in layout.kinds() if k in ("cls", "patch")]  # the rows image_token_mask keeps
    return layout.image_token_mask(), torch.tensor([k == "patch" for k in kinds])


@torch.no_grad()
def collect_stats(model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, batch_size: int = 64,
                  max_images: int | None = None, k: int = 10, tau: float = 0.2, skips: SkipLog | None = None,
                  progress: bool = True) -> LatentStats:
    """One pass over the first `max_images` images of `ds` (unreadable ones are skipped into `skips`)."""
    sae = sae.to(model.device).eval()
    rows_T, patch_rows_T = image_rows(model)
    acc = LatentAccumulator(sae.cfg.d_sae, len(ds.class_names), int(rows_T.sum()), k, tau)
    order = range(min(len(ds), max_images)) if max_images else None
    chunk = max(1, ENCODE_ELEMENTS // (int(rows_T.sum()) * sae.cfg.d_sae))
    for pixels, labels, idx in iter_batches(ds, model.preprocess, batch_size, order, skips,
                                            "analyze" if progress else None):
        h_BTD = model.block_output(pixels, layer)[:, rows_T]
        for s in range(0, len(labels), chunk):
            f_BTS = sae.encode(h_BTD[s: s + chunk])
            acc.update(f_BTS, labels[s: s + chunk], idx[s: s + chunk], patch_rows_T)
    return acc.result()


def label_entropy(value_SK: torch.Tensor, label_SK: torch.Tensor, n_classes: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy in nats, majority label) of each latent's reference images, each label weighted by the summed
    activation of its images. Latents with no reference image get entropy 0 and majority -1."""
    valid_SK = label_SK >= 0
    w_SC = torch.zeros(value_SK.shape[0], n_classes, dtype=torch.float64)
    w_SC.scatter_add_(1, label_SK.clamp_min(0), torch.where(valid_SK, value_SK, 0.0).double())
    total_S = w_SC.sum(1, keepdim=True)
    p_SC = w_SC / total_S.clamp_min(1e-30)
    ent_S = -(p_SC * torch.where(p_SC > 0, p_SC.log(), 0.0)).sum(1)
    majority_S = torch.where(total_S[:, 0] > 0, w_SC.argmax(1), -1)
    return ent_S.float().clamp_min(0.0) + 0.0, majority_S  # + 0.0 turns -0.0 into 0.0


def dataset_counts(class_counts_CS: torch.Tensor) -> torch.Tensor:
    """Dataset-level counts: the sum over all classes."""
    return class_counts_CS.sum(0)


def group_counts(class_counts_CS: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Group-level counts: the sum over a chosen set of classes."""
    return class_counts_CS[torch.as_tensor(classes, dtype=torch.long)].sum(0)


def resolve_classes(wanted: list[str], class_names) -> list[int]:
    """Class names (or integer ids) given by a user -> class ids, or one clear error."""
    out = []
    for w in wanted:
        if w in class_names:
            out.append(list(class_names).index(w))
        elif w.lstrip("-").isdigit() and 0 <= int(w) < len(class_names):
            out.append(int(w))
        else:
            raise PatchSAEError(f"unknown class {w!r} for --group; the dataset's classes are {list(class_names)}")
    return out

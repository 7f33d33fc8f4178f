"""Latent kinds and the "most interpretable" order: which latents are concepts, and which only look like ones.

A latent's label entropy over its ten reference images says little on its own: a latent that fires on every
image (dense) or at one token position of every image (positional) still has ten strongest images, and they
may happen to share a label. So each latent is also read through three streaming statistics of the `analyze`
pass (`analysis.latents.LatentStats`):

- class selectivity: the distribution of its class-level counts over classes (each class's count per image of
  that class, so unequal class sizes do not pass for selectivity), as the largest share and the normalised
  entropy (0 = one class, 1 = uniform);
- spatial concentration: the share of its activation mass (summed over images) at its strongest token
  position (CLS or one patch), and that position;
- density: the fraction of images on which it fires.

Kinds, the first rule that holds (thresholds in `KindThresholds`):
  dead             never fired on the analysed images;
  positional       more than `positional_share` of its activation mass sits at one token position;
  dense            fires on more than `dense_frequency` of the images;
  class-selective  at least `selective_share` of its class-level count is in one class, over at least
                   `min_count` tokens above tau;
  other            the rest (alive, spread over positions and classes, not dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Sequence

import torch

from patchsae import PatchSAEError

KINDS = ("class-selective", "other", "positional", "dense", "dead")  # also the listing order of the kinds
SHOWN_BY_DEFAULT = ("class-selective", "other")  # what "most interpretable" lists unless asked for more


@dataclass(frozen=True)
class KindThresholds:
    """When a latent counts as dense, positional or class-selective (each a fraction in (0, 1])."""

    dense_frequency: float = 0.5  # fires (image-level activation > 0) on more than this fraction of images
    positional_share: float = 0.5  # more than this share of its activation mass at one token position
    selective_share: float = 0.5  # at least this share of its class-level count in one class
    min_count: int = 50  # and at least this many tokens above tau in all: a handful of tokens proves nothing

    def __post_init__(self):
        for name in ("dense_frequency", "positional_share", "selective_share"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise PatchSAEError(f"{name.replace('_', '-')} must be in (0, 1], not {v}")
        if self.min_count < 0:
            raise PatchSAEError(f"min-count must be at least 0, not {self.min_count}")


def class_shares(class_counts_CS: torch.Tensor, class_images_C: torch.Tensor | None = None) -> torch.Tensor:
    """p_CS: each latent's class-level counts as a distribution over classes, every count first divided by the
    number of images of its class (classes without images get 0). Columns of latents with no count are 0."""
    rate_CS = class_counts_CS.double()
    if class_images_C is not None:
        n_C = class_images_C.double()[:, None]
        rate_CS = torch.where(n_C > 0, rate_CS / n_C.clamp_min(1), 0.0)
    return (rate_CS / rate_CS.sum(0, keepdim=True).clamp_min(1e-30)).float()


def class_selectivity(p_CS: torch.Tensor, n_classes: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(share_S, norm_entropy_S, top_class_S): the largest class share, the entropy of the shares divided by
    ln(n_classes) (0 = one class, 1 = uniform), and the class holding the largest share. Latents with no
    count get share 0, entropy 1 and class -1."""
    C = n_classes or p_CS.shape[0]
    share_S, top_S = p_CS.max(0)
    ent_S = -(p_CS * torch.where(p_CS > 0, p_CS.log(), 0.0)).sum(0) / max(math.log(C), 1e-30)
    empty_S = p_CS.sum(0) == 0
    return (torch.where(empty_S, 0.0, share_S), torch.where(empty_S, 1.0, ent_S.clamp(0, 1)),
            torch.where(empty_S, -1, top_S))


def spatial_concentration(position_mass_ST: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(share_S, position_S): the share of each latent's activation mass at its strongest token position
    (0 = CLS, then patches in row-major order); latents with no mass get (0, -1)."""
    total_S = position_mass_ST.sum(1)
    top_S, pos_S = position_mass_ST.max(1)
    alive_S = total_S > 0
    return torch.where(alive_S, top_S / total_S.clamp_min(1e-30), 0.0).float(), torch.where(alive_S, pos_S, -1)


@dataclass(frozen=True)
class LatentKinds:
    """Per-latent kind and the statistics it was read from."""

    kind_S: torch.Tensor  # index into KINDS
    class_share_S: torch.Tensor
    class_entropy_S: torch.Tensor  # normalised: 0 = one class, 1 = uniform
    top_class_S: torch.Tensor  # -1 when there is no class-level count
    position_share_S: torch.Tensor
    top_position_S: torch.Tensor  # 0 = CLS, 1.. = patches row-major; -1 when it never fired

    def names(self) -> list[str]:
        return [KINDS[k] for k in self.kind_S.tolist()]

    def counts(self) -> dict[str, int]:
        """Latents per kind, every kind listed."""
        n_K = torch.bincount(self.kind_S.long(), minlength=len(KINDS))
        return {k: int(n) for k, n in zip(KINDS, n_K)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.__dict__.items()}


def classify(fired_S: torch.Tensor, frequency_S: torch.Tensor, class_counts_CS: torch.Tensor,
             position_mass_ST: torch.Tensor, class_images_C: torch.Tensor | None = None,
             thresholds: KindThresholds = KindThresholds()) -> LatentKinds:
    """Each latent's kind by the first rule that holds (module docstring): dead, positional, dense,
    class-selective, other."""
    t = thresholds
    share_S, ent_S, top_S = class_selectivity(class_shares(class_counts_CS, class_images_C), class_counts_CS.shape[0])
    pos_share_S, pos_S = spatial_concentration(position_mass_ST)
    selective_S = (share_S >= t.selective_share) & (class_counts_CS.sum(0) >= max(t.min_count, 1))
    kind_S = torch.full_like(fired_S, KINDS.index("other"), dtype=torch.int8)
    for name, rule_S in reversed([("dead", fired_S == 0), ("positional", pos_share_S > t.positional_share),
                                  ("dense", frequency_S > t.dense_frequency), ("class-selective", selective_S)]):
        kind_S[rule_S] = KINDS.index(name)  # later writes win: the list's first rule has the last word
    return LatentKinds(kind_S, share_S, ent_S, top_S, pos_share_S, pos_S)


def check_shown(shown: Collection[str]) -> tuple[str, ...]:
    """The kinds a listing shows, in KINDS order; dead latents are never listed."""
    bad = [k for k in shown if k not in KINDS or k == "dead"]
    if bad or not shown:
        raise PatchSAEError(f"kinds to show must be some of {', '.join(KINDS[:-1])}, not {', '.join(bad) or 'none'}")
    return tuple(k for k in KINDS if k in shown)


def interpretable_order(kinds: LatentKinds, entropy_S: torch.Tensor, frequency_S: torch.Tensor,
                        shown: Collection[str] = SHOWN_BY_DEFAULT) -> list[int]:
    """Latents of the `shown` kinds, most interpretable first: by kind (class-selective, other, positional,
    dense), then by class selectivity (largest class share), then the paper's label entropy of the reference
    images (low first), then frequency (high first)."""
    shown_ids = [KINDS.index(k) for k in check_shown(shown)]
    keep = [l for l, k in enumerate(kinds.kind_S.tolist()) if k in shown_ids]
    share, ent, freq, kind = (kinds.class_share_S.tolist(), entropy_S.tolist(), frequency_S.tolist(),
                              kinds.kind_S.tolist())
    return sorted(keep, key=lambda l: (kind[l], -share[l], ent[l], -freq[l], l))


def class_specific_order(p_CS: torch.Tensor, class_counts_CS: torch.Tensor, c: int, min_count: int = 0
                         ) -> list[int]:
    """Latents of class `c`, most specific first: by the class's share of the latent's class-level count
    (p_CS), then by the count itself; only latents with a count in `c` and `min_count` tokens in all."""
    count_S, total_S, share_S = class_counts_CS[c], class_counts_CS.sum(0), p_CS[c]
    keep = torch.nonzero((count_S > 0) & (total_S >= min_count)).flatten().tolist()
    share, count = share_S.tolist(), count_S.tolist()
    return sorted(keep, key=lambda l: (-share[l], -count[l], l))


def relative_activation(value_N: torch.Tensor, latent_N: torch.Tensor, mean_act_S: torch.Tensor) -> torch.Tensor:
    """An image's activation of each latent divided by the latent's typical activation (its mean image-level
    activation over the images where it fires): 1 = as usual, 5 = five times stronger than usual. Latents
    with no typical activation give 0."""
    typical_N = mean_act_S[latent_N].to(value_N.dtype)
    return torch.where(typical_N > 0, value_N / typical_N.clamp_min(1e-30), 0.0)


def honest_name(name: str, score: float, kind: str) -> str:
    """A concept name with its score, marked as a guess unless the latent is class-selective:
    "bag (0.71)", "t-shirt? (non-selective, 0.52)", "bag? (positional, 0.66)"."""
    if not name or kind == "dead":
        return ""
    if kind == "class-selective":
        return f"{name} ({score:.2f})"
    why = "non-selective" if kind == "other" else kind
    return f"{name}? ({why}, {score:.2f})"


def position_label(position: int, grid: Sequence[int], n_cls: int = 1) -> str:
    """A token position as people read it: "CLS" or "patch (row, col)"."""
    if position < 0:
        return ""
    if position < n_cls:
        return "CLS"
    r, c = divmod(position - n_cls, grid[1])
    return f"patch ({r}, {c})"

"""Latent rankings and masks for top-k masking: a ranking is the position of every latent (0 = first), so "latent
s is in the top k" is pos[s] < k for every k at once.

Rankings (`selection`):
  class    class-level counts (tokens with activation > tau, summed per class) of the image's TRUE class, so the
           mask differs per image; the paper's choice
  dataset  dataset-level counts (the sum over classes), one ranking for all images
  random   a seeded random permutation of the latents, one per seed
"""

from __future__ import annotations

from typing import Sequence

import torch

K_GRID = (1, 2, 5, 10, 50, 100, 500, 1000, 2000, None)  # None = all latents
SELECTIONS = ("class", "dataset", "random")


def k_values(d_sae: int, ks: Sequence[int | None] = K_GRID) -> list[int]:
    """The k grid capped at d_sae (None = all), deduplicated and sorted."""
    return sorted({d_sae if k is None else min(int(k), d_sae) for k in ks})



def rank_positions(counts_XS: torch.Tensor) -> torch.Tensor:
    """Position of every latent in the descending ranking of each row (0 = most counted); ties keep latent order.

    With positions, "latent s is in the top-k of class c" is just pos[c, s] < k, for every k at once."""
    order_XS = torch.argsort(counts_XS, dim=-1, descending=True, stable=True)
    pos_XS = torch.empty_like(order_XS)
    pos_XS.scatter_(-1, order_XS, torch.arange(counts_XS.shape[-1]).expand_as(order_XS).contiguous())
    return pos_XS


def random_positions(d_sae: int, seed: int) -> torch.Tensor:
    """A seeded random ranking (positions of a random permutation)."""
    gen = torch.Generator().manual_seed(seed)
    return rank_positions(torch.rand(d_sae, generator=gen))


def keep_mask(pos: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """"on": keep the top-k ranked latents; "off": remove them."""
    if mode not in ("on", "off"):
        raise ValueError(f"mode must be on or off, not {mode!r}")
    return pos < k if mode == "on" else pos >= k


def image_positions(pos_XS: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """Per-image ranking positions (B, d_sae): row `label` of a class ranking, or a shared ranking broadcast."""
    return pos_XS[labels_B] if pos_XS.dim() == 2 else pos_XS.expand(len(labels_B), -1)


def masked_latents(f_BTS: torch.Tensor, pos_BS: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """The dense definition of a mask: f with the latents outside the image's kept set zeroed (every token)."""
    return f_BTS * keep_mask(pos_BS, k, mode)[:, None, :]


"""The adaptation groups (the paper's Table 1): per (class, latent), is the latent high or low in CLIP's and in the
adapted model's class-level counts?

  high   rank < top_n within the class (0 = most counted) and count > 0      (default top_n = 50)
  low    rank >= low_rank or count == 0                                       (default low_rank = 2 x top_n)
  re-used (high in both), high->low (suppressed), low->high (introduced), shifted (neither: slipped just past
  top_n). With low_rank = top_n, the pure top-N rule, high->low and low->high are always equal in number.
"""

from __future__ import annotations

from typing import Sequence

import torch

from patchsae import PatchSAEError
from patchsae.analysis.rankings import rank_positions

GROUPS = ("high", "high_to_low", "low_to_high")


def high_low(counts_CS: torch.Tensor, top_n: int, low_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) boolean masks (classes x d_sae): high = in the class's top_n by count and counted at all;
    low = at rank low_rank or beyond, or never counted."""
    pos_CS = rank_positions(counts_CS)
    return (pos_CS < top_n) & (counts_CS > 0), (pos_CS >= low_rank) | (counts_CS == 0)


def latent_groups(clip_CS: torch.Tensor, adapted_CS: torch.Tensor, top_n: int = 50,
                  low_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Per (class, latent) membership in the paper's groups, as boolean (classes x d_sae) masks."""
    low_rank = 2 * top_n if low_rank is None else low_rank
    if top_n < 1 or low_rank < top_n:
        raise PatchSAEError(f"need top_n >= 1 and low_rank >= top_n (got {top_n}, {low_rank})")
    if clip_CS.shape != adapted_CS.shape:
        raise PatchSAEError(f"count matrices differ in shape: {tuple(clip_CS.shape)} vs {tuple(adapted_CS.shape)}")
    hi_a, lo_a = high_low(clip_CS, top_n, low_rank)
    hi_b, lo_b = high_low(adapted_CS, top_n, low_rank)
    return {"high": hi_a & hi_b, "high_to_low": hi_a & lo_b, "low_to_high": lo_a & hi_b,
            "shifted": (hi_a & ~hi_b & ~lo_b) | (hi_b & ~hi_a & ~lo_a)}


def group_table(groups: dict[str, torch.Tensor], base: Sequence[int], novel: Sequence[int]) -> dict:
    """Average number of latents per class in each group, over the base and over the novel classes."""
    out = {}
    for g, mask_CS in groups.items():
        per_class = mask_CS.sum(1).double()
        out[g] = {part: (float(per_class[list(cls)].mean()) if len(cls) else None)
                  for part, cls in (("base", base), ("novel", novel))}
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else float("nan")



def class_mean(xs: Sequence[float], idx: Sequence[int]) -> float | None:
    """Mean of xs over the classes in idx (None for no classes)."""
    return sum(xs[i] for i in idx) / len(idx) if idx else None

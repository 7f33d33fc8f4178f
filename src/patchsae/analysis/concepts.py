"""Concept names chosen by CLIP itself (a model without a text tower, such as DINOv2, falls back to the majority
label of each latent's reference images: `majority_names`).

Method used for the names: the mean normalised image embedding of a latent's top reference images (by
image-level activation), m_l = mean_{i in R_l} norm(emb(i)), ranked against a vocabulary of candidate phrases
by cosine similarity. The vocabulary is the dataset's class names, each the prompt-ensembled text embedding
over the model's templates (as `ClipModel.text_head`), plus any user phrases embedded as written.

Optional diagnostic (`steer=True`, `patchsae analyze --steer`): steering at the hooked block. Add
alpha_l * d_l to every image token of the references' residual stream (d_l = W_dec[l] / input_scale, the
decoder direction in raw activation space; alpha_l the latent's largest single-patch activation), finish the
forward pass, and average the change of the normalised embedding,
  delta_l = mean_i [norm(emb(h_i + alpha_l d_l)) - norm(emb(h_i))].
Measured on the embedded model it does not name latents by their references' class (about 4 % agreement on
the low-entropy latents, against 100 % for the mean embedding): the change contains
-(1 - cos) * norm(emb(h_i)), which penalises exactly the class the references already show, whose score is
saturated anyway. (Steering a fixed set of unrelated images instead gave about 55 % in a side experiment.)
It costs k forward passes of the blocks above the hook per latent, so it is off by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from patchsae import PatchSAEError
from patchsae.analysis.latents import LatentStats
from patchsae.analysis.patch_maps import load_pixels
from patchsae.data.base import LabelledImages
from patchsae.models.clip import ClipModel
from patchsae.sae.model import SAE

PAIRS_PER_FORWARD = 1024  # (latent, reference image) pairs finished in one forward pass


def read_phrases(path: str | Path) -> list[str]:
    """One phrase per line; blank lines and lines starting with # are ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PatchSAEError(f"cannot read phrases file {path}: {exc}") from None
    phrases = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not phrases:
        raise PatchSAEError(f"phrases file {path} has no phrases (one per line)")
    return phrases


@torch.no_grad()
def vocabulary(model: ClipModel, class_names: Sequence[str], phrases: Sequence[str] = ()
               ) -> tuple[list[str], torch.Tensor]:
    """(names, emb_VE): class names through the model's template ensemble, then each phrase as written;
    duplicates of a class name are dropped. Rows are unit vectors."""
    names = list(class_names)
    emb = [model.text_head(names)]
    extra = [p for p in dict.fromkeys(phrases) if p not in names]
    if extra:
        emb.append(F.normalize(model.text_features(extra), dim=-1))
    return names + extra, torch.cat(emb).float().cpu()


def _image_ids(top_index_SK: torch.Tensor) -> list[int]:
    """The distinct dataset indices in a table of reference images (-1 = empty slot), sorted."""
    return torch.unique(top_index_SK[top_index_SK >= 0]).tolist()


@torch.no_grad()
def mean_reference_embeddings(model: ClipModel, ds: LabelledImages, stats: LatentStats, batch_size: int = 256
                              ) -> torch.Tensor:
    """mean_SE: per latent the mean normalised image embedding of its reference images (each distinct image
    runs through the model once); latents with no reference images get zero rows."""
    unique = _image_ids(stats.top_index_SK)
    emb = {}
    for start in range(0, len(unique), batch_size):
        pixels = load_pixels(model, ds, unique[start: start + batch_size])
        if pixels:
            emb_BE = F.normalize(model.image_features(torch.stack(list(pixels.values()))), dim=-1).float().cpu()
            emb.update(zip(pixels, emb_BE))
    if not emb:
        return torch.zeros(stats.d_sae, 1)
    mean_SE = torch.zeros(stats.d_sae, next(iter(emb.values())).shape[0])
    for l, refs in enumerate(stats.top_index_SK.tolist()):
        rows = [emb[i] for i in refs if i in emb]
        if rows:
            mean_SE[l] = torch.stack(rows).mean(0)
    return mean_SE


@torch.no_grad()
def concept_directions(model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, stats: LatentStats,
                       steer: bool = True, latents_per_chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(steer_SE, mean_SE): per latent the mean change of the normalised image embedding when its decoder
    direction is added at the hooked block (zeros unless `steer`: it costs k forward passes per latent), and
    the mean normalised embedding of its reference images. Latents with no reference images get zero rows."""
    sae = sae.to(model.device).eval()
    rows_T = model.layout().image_token_mask().to(model.device)
    dir_SD = sae.raw_decoder_rows().detach()
    alpha_S = stats.patch_value_SK[:, 0].to(model.device)
    S = stats.d_sae
    steer_SE = mean_SE = None
    for start in range(0, S, latents_per_chunk):
        lat = range(start, min(start + latents_per_chunk, S))
        refs_LK = stats.top_index_SK[lat.start: lat.stop]
        unique = _image_ids(refs_LK)
        if not unique:
            continue
        pixels = load_pixels(model, ds, unique)
        unique = [i for i in unique if i in pixels]
        pos = {i: n for n, i in enumerate(unique)}
        h_UTD = model.block_output(torch.stack([pixels[i] for i in unique]), layer)
        base_UE = F.normalize(model.finish_from(h_UTD, layer), dim=-1)
        if steer_SE is None:
            steer_SE = torch.zeros(S, base_UE.shape[1])
            mean_SE = torch.zeros(S, base_UE.shape[1])
        pairs = [(l, pos[i]) for l, refs in zip(lat, refs_LK.tolist()) for i in refs if i in pos]
        for p0 in range(0, len(pairs), PAIRS_PER_FORWARD):
            lat_P, img_P = (torch.tensor(x) for x in zip(*pairs[p0: p0 + PAIRS_PER_FORWARD]))
            mean_SE.index_add_(0, lat_P, base_UE[img_P].float().cpu())
            if steer:
                push_PD = alpha_S[lat_P, None] * dir_SD[lat_P]
                h_PTD = h_UTD[img_P] + rows_T[None, :, None] * push_PD[:, None, :]
                diff_PE = F.normalize(model.finish_from(h_PTD, layer), dim=-1) - base_UE[img_P]
                steer_SE.index_add_(0, lat_P, diff_PE.float().cpu())
    if steer_SE is None:
        return torch.zeros(S, 1), torch.zeros(S, 1)
    n_S = (stats.top_index_SK >= 0).sum(1).clamp_min(1)[:, None]
    return steer_SE / n_S, mean_SE / n_S


def name_latents(direction_SE: torch.Tensor, vocab_VE: torch.Tensor, top: int = 3
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(name_index_SN, name_score_SN): the `top` phrases by cosine similarity; latents with a zero direction
    (no reference images) get index -1 and score 0."""
    top = min(top, vocab_VE.shape[0])
    if direction_SE.shape[1] != vocab_VE.shape[1]:  # no latent had references
        return torch.full((direction_SE.shape[0], top), -1), torch.zeros(direction_SE.shape[0], top)
    sim_SV = F.normalize(direction_SE, dim=-1) @ vocab_VE.T
    score_SN, index_SN = sim_SV.topk(top, dim=1)
    empty_S = direction_SE.norm(dim=1) == 0
    return torch.where(empty_S[:, None], -1, index_SN), torch.where(empty_S[:, None], 0.0, score_SN)


def majority_names(value_SK: torch.Tensor, label_SK: torch.Tensor, majority_S: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(name_index_SN, name_score_SN) with N = 1 for a model without a text tower: the majority label of the
    latent's reference images (`latents.label_entropy`'s), scored by that label's share of the references' summed
    activation; latents with no references get index -1 and score 0."""
    valid_SK = (label_SK >= 0) & (label_SK == majority_S[:, None])
    share_S = (torch.where(valid_SK, value_SK, 0.0).double().sum(1)
               / torch.where(label_SK >= 0, value_SK, 0.0).double().sum(1).clamp_min(1e-30))
    return majority_S[:, None].clone(), torch.where(majority_S >= 0, share_S, 0.0).float()[:, None]


def name_agreement(name_index_S: torch.Tensor, majority_S: torch.Tensor, low_S: torch.Tensor,
                   names: Sequence[str], class_names: Sequence[str]) -> tuple[float | None, int]:
    """Fraction of the latents in `low_S` whose top name is the class name of their references' majority
    label; (None, 0) when there are none."""
    ids = torch.nonzero(low_S).flatten().tolist()
    if not ids:
        return None, 0
    hits = sum(1 for l in ids if int(name_index_S[l]) >= 0 and int(majority_S[l]) >= 0
               and names[int(name_index_S[l])] == class_names[int(majority_S[l])])
    return hits / len(ids), len(ids)

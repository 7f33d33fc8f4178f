"""The auxiliary losses that revive dead latents, as functions of an SAE and its batch: ghost grads (ReLU)
and AuxK (TopK family); and BatchStats, how their batch-level statistics are reduced across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from patchsae.sae.kernels import GatherPreActs

if TYPE_CHECKING:
    from patchsae.sae.base import SAE


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class BatchStats:
    """How the few batch-level statistics of a loss (AuxK's residual variance, the ghost-grad scale,
    BatchTopK's smallest kept activation) are reduced. One process: the identity. A distributed trainer passes
    functions that turn a rank's mean over its tokens into the mean over the global batch, and a rank's minimum
    into the global one, so every rank computes the loss of the same global batch."""

    mean: Callable[[torch.Tensor], torch.Tensor] = _same  # a rank's mean over its tokens -> the global mean
    min: Callable[[torch.Tensor], torch.Tensor] = _same  # a rank's minimum -> the global minimum


LOCAL = BatchStats()


def ghost_loss(sae: SAE, x_ND: torch.Tensor, err_ND: torch.Tensor, mse: torch.Tensor, dead_S: torch.Tensor,
               stats: BatchStats = LOCAL) -> torch.Tensor:
    """Ghost grads: dead latents, with exp() activations, are asked to explain the residual the live
    ones leave, scaled to half its norm; the term is rescaled to the size of the MSE. Gradients reach only
    dead latents' encoder columns, biases and decoder rows."""
    resid_ND = (-err_ND).detach()
    xs_ND = (x_ND * sae.input_scale - sae.b_dec).detach()
    pre_dead_ND = xs_ND @ sae.W_enc[:, dead_S] + sae.b_enc[dead_S]
    ghost_out_ND = torch.exp(pre_dead_ND) @ sae.W_dec[dead_S]
    scale_N = resid_ND.norm(dim=-1) / (2 * ghost_out_ND.norm(dim=-1) + 1e-6)
    ghost_out_ND = ghost_out_ND * scale_N[:, None].detach()
    ghost_mse = (ghost_out_ND - resid_ND).pow(2).mean()
    return (stats.mean(mse.detach()) / (stats.mean(ghost_mse.detach()) + 1e-6)) * ghost_mse


def aux_k_loss(sae: SAE, pre_NS: torch.Tensor, err_ND: torch.Tensor, dead_S: torch.Tensor,
               xc_ND: torch.Tensor | None = None, stats: BatchStats = LOCAL) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the top aux_k dead latents reconstruct the main residual, normalised by
    the residual's variance. Decoded sparsely; with xc_ND (pre_NS then has no graph) the encoder gradient
    also goes through the gathered columns only."""
    aux_k = min(sae.cfg.aux_k or sae.cfg.d_model // 2, int(dead_S.sum()))
    with torch.no_grad():
        pre_dead_NS = torch.where(dead_S, pre_NS, torch.full_like(pre_NS, -torch.inf))
        idx_NK = pre_dead_NS.topk(aux_k, dim=-1, sorted=False).indices
    vals_NK = (pre_NS.gather(-1, idx_NK) if xc_ND is None
               else GatherPreActs.apply(xc_ND, sae.W_enc, sae.b_enc, sae.b_dec, pre_NS, idx_NK))
    resid_ND = (-err_ND).detach()
    recon_ND = F.embedding_bag(idx_NK, sae.W_dec, per_sample_weights=F.relu(vals_NK), mode="sum")
    denom = stats.mean((resid_ND - stats.mean(resid_ND.mean(0))).pow(2).mean()).clamp_min(1e-12)
    return (recon_ND - resid_ND).pow(2).mean() / denom


def token_norms(xs_ND: torch.Tensor) -> torch.Tensor:
    """||x_n||_2 per token, the reference objective's normaliser; a zero token (never a real activation)
    gets the smallest positive number instead of a division by zero."""
    return xs_ND.norm(dim=-1).clamp_min(torch.finfo(xs_ND.dtype).tiny)


def reference_ghost_loss(sae: SAE, x_ND: torch.Tensor, err_ND: torch.Tensor, dead_S: torch.Tensor) -> torch.Tensor:
    """The reference code's ghost grads: the dead latents' exp() activations, decoded by their rows and scaled per
    token to half the residual's norm, reconstruct the residual r = x - x_hat; the error is normalised like the
    reference MSE, (ghost - r)^2 / ||r_n||, then each element is multiplied by the detached ratio of the main
    per-element error (x_hat - x)^2 / ||x_n|| (not CLS-weighted) to it, and averaged over (token, dim). As in the
    reference, the encoder input x - b_dec is not detached, so b_dec gets a gradient through the dead columns.
    Every statistic is per element: nothing to reduce across ranks."""
    xs_ND = x_ND * sae.input_scale
    resid_ND = (-err_ND).detach()
    resid_norm_N = token_norms(resid_ND)
    pre_dead_ND = (xs_ND - sae.b_dec) @ sae.W_enc[:, dead_S] + sae.b_enc[dead_S]
    ghost_out_ND = torch.exp(pre_dead_ND) @ sae.W_dec[dead_S]
    scale_N = resid_norm_N / (1e-6 + 2 * ghost_out_ND.norm(dim=-1))
    ghost_out_ND = ghost_out_ND * scale_N[:, None].detach()
    ghost_ND = (ghost_out_ND - resid_ND).pow(2) / resid_norm_N[:, None]
    main_ND = err_ND.detach().pow(2) / token_norms(xs_ND)[:, None]
    return ((main_ND / (ghost_ND.detach() + 1e-6)) * ghost_ND).mean()

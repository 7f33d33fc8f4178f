"""The paper's ReLU SAE: f = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec, trained with
MSE + lambda * L1 and ghost grads for dead latents, under one of two objectives (SAEConfig.objective):

scaled     inputs scaled once so E||x||^2 = d_model; mse = mean over (token, dim) of err^2.
reference  the reference code's: raw inputs; mse = mean over (token, dim) of c_n err^2 / ||x_n||_2, with
           c_n = mse_cls_coefficient on CLS rows, else 1; its ghost-grad normalisation; Kaiming-uniform
           independent W_enc and W_dec.
Both: L1 = sum over latents of f, averaged over tokens. Each runs a sparse and a dense fast path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchsae import PatchSAEError

from patchsae.sae.base import SAE, geometric_median, register
from patchsae.sae.config import SAEConfig
from patchsae.sae.kernels import GatherPreActs, ReLUObjective, mask_to_pairs
from patchsae.sae.losses import LOCAL, BatchStats, ghost_loss, reference_ghost_loss, token_norms

RELU_SPARSE_DENSITY = 0.02  # ReLU training runs sparse while at most this fraction of (token, latent) pairs fire


@register("relu")
class ReLUSAE(SAE):
    def activate(self, pre_NS: torch.Tensor, inference: bool = True) -> torch.Tensor:
        return F.relu(pre_NS)

    @torch.no_grad()
    def _select(self, pre_NS: torch.Tensor, inference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return mask_to_pairs(F.relu(pre_NS), pre_NS > 0.0)

    def _row_weights(self, x_ND: torch.Tensor, cls_N: torch.Tensor | None) -> torch.Tensor | None:
        """Per-token weights of the squared error (tokens,), None for the plain mean."""
        return None

    def loss(self, x_ND: torch.Tensor, dead_S: torch.Tensor | None = None,
             stats: BatchStats = LOCAL, cls_N: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Sparse while few latents fire (a trained ReLU SAE: the paper's L0 of 149 is 0.3 % of 49,152), else
        the dense objective; both compute the same loss and gradients."""
        w_N = self._row_weights(x_ND, cls_N)
        xc_ND, pre_NS = self._pre_acts_workspace(x_ND)
        with torch.no_grad():
            on_NS = torch.gt(pre_NS, 0, out=self._buffer("mask", pre_NS.shape, torch.bool, x_ND.device))
            nnz = int(torch.count_nonzero(on_NS))
        if nnz <= RELU_SPARSE_DENSITY * on_NS.numel():
            loss, parts, err_ND, mse = self._sparse_loss(x_ND, xc_ND, pre_NS, on_NS, w_N)
        else:
            loss, parts, err_ND, mse = self._dense_loss(x_ND, pre_NS, w_N)
        if self.cfg.ghost_grads and dead_S is not None and dead_S.any():
            ghost = self._ghost_loss(x_ND, err_ND, mse, dead_S, stats)
            loss = loss + ghost
            parts["ghost"] = ghost.detach()
        return loss, parts

    def _ghost_loss(self, x_ND, err_ND, mse, dead_S, stats: BatchStats = LOCAL) -> torch.Tensor:
        return ghost_loss(self, x_ND, err_ND, mse, dead_S, stats)

    def _sparse_loss(self, x_ND, xc_ND, pre_NS, on_NS, w_N=None):
        """(loss, parts, err_ND, mse) of ReLU + L1 from the (token, latent) pairs with pre > 0: encoder gradient
        through the gathered pairs, decoder as embedding bags of variable size."""
        n = len(x_ND)
        with torch.no_grad():
            rows, cols = on_NS.nonzero(as_tuple=True)  # row-major: rows sorted
            offsets = torch.searchsorted(rows, torch.arange(n, device=rows.device))
        vals = GatherPreActs.apply(xc_ND, self.W_enc, self.b_enc, self.b_dec, pre_NS, cols, rows)
        x_hat = F.embedding_bag(cols, self.W_dec, offsets, per_sample_weights=vals, mode="sum") + self.b_dec
        err_ND = x_hat - x_ND * self.input_scale
        sq_ND = err_ND.pow(2) if w_N is None else err_ND.pow(2) * w_N[:, None]
        mse, l1 = sq_ND.mean(), vals.sum() / n
        loss = mse + self.cfg.l1_coeff * l1
        parts = {"mse": mse.detach(), "l1": l1.detach(), "l0": torch.tensor(len(cols) / n, device=x_ND.device),
                 "fired_S": torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x_ND.device).index_fill_(0, cols, True)}
        return loss, parts, err_ND, mse

    def _dense_loss(self, x_ND, pre_NS, w_N=None):
        """(loss, parts, err_ND, mse) of ReLU + L1 through the hand-written dense objective."""
        loss, mse, l1, f_NS, err_ND = ReLUObjective.apply(
            x_ND * self.input_scale, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.cfg.l1_coeff, pre_NS,
            self._buffer("g", pre_NS.shape, x_ND.dtype, x_ND.device),
            self._buffer("mask", pre_NS.shape, torch.bool, x_ND.device), w_N)
        parts = {"mse": mse.detach(), "l1": l1.detach(), "l0": torch.count_nonzero(f_NS) / len(f_NS),
                 "fired_S": f_NS.amax(0) > 0}
        return loss, parts, err_ND, mse


@register("relu", objective="reference")
class ReferenceReLUSAE(ReLUSAE):
    """The ReLU SAE under the reference code's objective (see the module docstring). input_scale stays 1:
    the reference trains on raw activations, and the paper's lambda = 8e-5 belongs to that scale."""

    @staticmethod
    def _initial_weights(cfg: SAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent Kaiming-uniform W_enc (d_model, d_sae) and W_dec (d_sae, d_model), drawn in that
        order; decoder rows then normalised to unit length."""
        W_enc_DS = nn.init.kaiming_uniform_(torch.empty(cfg.d_model, cfg.d_sae))
        W_dec_SD = nn.init.kaiming_uniform_(torch.empty(cfg.d_sae, cfg.d_model))
        return W_enc_DS, F.normalize(W_dec_SD, dim=1)

    @torch.no_grad()
    def init_from_sample(self, x_ND: torch.Tensor) -> None:
        """b_dec = the geometric median of a first sample of raw activations; no input scaling."""
        self.b_dec.copy_(geometric_median(x_ND.float()))

    def _row_weights(self, x_ND: torch.Tensor, cls_N: torch.Tensor | None) -> torch.Tensor:
        """c_n / ||x_n||_2: the reference's per-token normalisation, CLS rows weighted by mse_cls_coefficient."""
        w_N = token_norms(x_ND * self.input_scale).reciprocal()
        c = self.cfg.mse_cls_coefficient
        if c != 1.0:
            if cls_N is None:
                raise PatchSAEError("mse_cls_coefficient != 1 needs the CLS rows of each batch (cls_N); "
                                    "this token source does not give them")
            w_N = torch.where(cls_N.to(w_N.device), w_N * c, w_N)
        return w_N

    def _ghost_loss(self, x_ND, err_ND, mse, dead_S, stats: BatchStats = LOCAL) -> torch.Tensor:
        return reference_ghost_loss(self, x_ND, err_ND, dead_S)

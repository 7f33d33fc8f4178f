"""The paper's ReLU SAE: f = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec, trained with
MSE + lambda * L1 and ghost grads for dead latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchsae.sae.base import SAE, register
from patchsae.sae.kernels import GatherPreActs, ReLUObjective, mask_to_pairs
from patchsae.sae.losses import LOCAL, BatchStats, ghost_loss

RELU_SPARSE_DENSITY = 0.02  # ReLU training runs sparse while at most this fraction of (token, latent) pairs fire


@register("relu")
class ReLUSAE(SAE):
    def activate(self, pre_NS: torch.Tensor, inference: bool = True) -> torch.Tensor:
        return F.relu(pre_NS)

    @torch.no_grad()
    def _select(self, pre_NS: torch.Tensor, inference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return mask_to_pairs(F.relu(pre_NS), pre_NS > 0.0)

    def loss(self, x_ND: torch.Tensor, dead_S: torch.Tensor | None = None,
             stats: BatchStats = LOCAL) -> tuple[torch.Tensor, dict]:
        """Sparse while few latents fire (a trained ReLU SAE: the paper's L0 of 149 is 0.3 % of 49,152), else
        the dense objective; both compute the same loss and gradients."""
        xc_ND, pre_NS = self._pre_acts_workspace(x_ND)
        with torch.no_grad():
            on_NS = torch.gt(pre_NS, 0, out=self._buffer("mask", pre_NS.shape, torch.bool, x_ND.device))
            nnz = int(torch.count_nonzero(on_NS))
        if nnz <= RELU_SPARSE_DENSITY * on_NS.numel():
            loss, parts, err_ND, mse = self._sparse_loss(x_ND, xc_ND, pre_NS, on_NS)
        else:
            loss, parts, err_ND, mse = self._dense_loss(x_ND, pre_NS)
        if self.cfg.ghost_grads and dead_S is not None and dead_S.any():
            ghost = self._ghost_loss(x_ND, err_ND, mse, dead_S, stats)
            loss = loss + ghost
            parts["ghost"] = ghost.detach()
        return loss, parts

    def _ghost_loss(self, x_ND, err_ND, mse, dead_S, stats: BatchStats = LOCAL) -> torch.Tensor:
        return ghost_loss(self, x_ND, err_ND, mse, dead_S, stats)

    def _sparse_loss(self, x_ND, xc_ND, pre_NS, on_NS):
        """(loss, parts, err_ND, mse) of ReLU + L1 from the (token, latent) pairs with pre > 0: encoder gradient
        through the gathered pairs, decoder as embedding bags of variable size."""
        n = len(x_ND)
        with torch.no_grad():
            rows, cols = on_NS.nonzero(as_tuple=True)  # row-major: rows sorted
            offsets = torch.searchsorted(rows, torch.arange(n, device=rows.device))
        vals = GatherPreActs.apply(xc_ND, self.W_enc, self.b_enc, self.b_dec, pre_NS, cols, rows)
        x_hat = F.embedding_bag(cols, self.W_dec, offsets, per_sample_weights=vals, mode="sum") + self.b_dec
        err_ND = x_hat - x_ND * self.input_scale
        mse, l1 = err_ND.pow(2).mean(), vals.sum() / n
        loss = mse + self.cfg.l1_coeff * l1
        parts = {"mse": mse.detach(), "l1": l1.detach(), "l0": torch.tensor(len(cols) / n, device=x_ND.device),
                 "fired_S": torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x_ND.device).index_fill_(0, cols, True)}
        return loss, parts, err_ND, mse

    def _dense_loss(self, x_ND, pre_NS):
        """(loss, parts, err_ND, mse) of ReLU + L1 through the hand-written dense objective."""
        loss, mse, l1, f_NS, err_ND = ReLUObjective.apply(
            x_ND * self.input_scale, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.cfg.l1_coeff, pre_NS,
            self._buffer("g", pre_NS.shape, x_ND.dtype, x_ND.device),
            self._buffer("mask", pre_NS.shape, torch.bool, x_ND.device))
        parts = {"mse": mse.detach(), "l1": l1.detach(), "l0": torch.count_nonzero(f_NS) / len(f_NS),
                 "fired_S": f_NS.amax(0) > 0}
        return loss, parts, err_ND, mse

"""The TopK family, trained sparsely with the AuxK loss for dead latents.

TopK SAE:      f = TopK_k(ReLU((x - b_dec) W_enc + b_enc)), x_hat = f W_dec + b_dec.
BatchTopK SAE: the batch's top (tokens x k) of ReLU(pre) in training; afterwards a JumpReLU with one
               threshold, a running estimate of the smallest activation the batch selection kept.
Training decodes from the k active (index, value) pairs only, so the (tokens x d_sae) matrix is built once,
by the encoder's forward product, and never enters a backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchsae.sae.base import SAE, register
from patchsae.sae.config import SAEConfig
from patchsae.sae.kernels import mask_to_pairs
from patchsae.sae.losses import LOCAL, BatchStats, aux_k_loss
from patchsae.sae.topk_select import topk_rows

THRESHOLD_EMA = 0.01  # BatchTopK: weight of each batch's smallest kept activation in the running threshold


class _TopKFamily(SAE):
    def loss(self, x_ND: torch.Tensor, dead_S: torch.Tensor | None = None,
             stats: BatchStats = LOCAL, cls_N: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Sparse MSE (+ aux_coeff * AuxK when latents are dead); BatchTopK's selection stays within x_ND."""
        vals_NK, idx_NK, xc_ND, pre_NS = self._sparse_code(x_ND, inference=False)
        err_ND = self.decode_sparse_scaled(vals_NK, idx_NK) - x_ND * self.input_scale
        mse = err_ND.pow(2).mean()
        on_NK = vals_NK.detach() > 0
        parts = {"mse": mse.detach(), "l0": on_NK.float().sum(-1).mean()}
        loss = mse
        if dead_S is not None and dead_S.any():
            aux = self._aux_k_loss(pre_NS, err_ND, dead_S, xc_ND, stats)
            loss = loss + self.cfg.aux_coeff * aux
            parts["aux"] = aux.detach()
        self._after_step(vals_NK.detach()[on_NK], stats)
        parts["fired_S"] = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x_ND.device).index_fill_(
            0, idx_NK[on_NK], True)
        return loss, parts

    def _aux_k_loss(self, pre_NS, err_ND, dead_S, xc_ND=None, stats: BatchStats = LOCAL) -> torch.Tensor:
        return aux_k_loss(self, pre_NS, err_ND, dead_S, xc_ND, stats)

    def _after_step(self, kept_vals: torch.Tensor, stats: BatchStats) -> None:
        """Hook run by `loss` with the activations the selection kept."""


@register("topk")
class TopKSAE(_TopKFamily):
    def activate(self, pre_NS: torch.Tensor, inference: bool = True) -> torch.Tensor:
        f_NS = F.relu(pre_NS)
        vals, idx = f_NS.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(f_NS).scatter_(-1, idx, vals)

    @torch.no_grad()
    def _select(self, pre_NS: torch.Tensor, inference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # ReLU is monotone: the k largest pre-activations are the k largest ReLU(pre). topk_rows: the same
        # selection as torch.topk, 1.6x faster on CPU at 49,152 latents (sae/topk_select.py)
        return topk_rows(pre_NS, self.cfg.k)[1], None


@register("batchtopk")
class BatchTopKSAE(_TopKFamily):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))  # 0 = no batch seen yet

    def activate(self, pre_NS: torch.Tensor, inference: bool = True) -> torch.Tensor:
        """Selects across the batch only with inference=False (training); by default it is the JumpReLU with
        the learnt threshold, so a token's code does not depend on its batch."""
        f_NS = F.relu(pre_NS)
        if inference:
            return f_NS * (pre_NS > self.threshold)
        return f_NS * self._batch_keep(f_NS.detach())

    @torch.no_grad()
    def _batch_keep(self, f_NS: torch.Tensor) -> torch.Tensor:
        """BatchTopK mask: the batch's (tokens x k) largest activations, wherever they fall."""
        flat = f_NS.reshape(-1)
        idx = flat.topk(min(self.cfg.k * (flat.numel() // self.cfg.d_sae), flat.numel()), sorted=False).indices
        return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, idx, True).view_as(f_NS)

    @torch.no_grad()
    def _select(self, pre_NS: torch.Tensor, inference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        f_NS = F.relu(pre_NS)
        if not inference:
            return mask_to_pairs(f_NS, self._batch_keep(f_NS))
        return mask_to_pairs(f_NS, pre_NS > self.threshold)

    def _after_step(self, kept_vals: torch.Tensor, stats: BatchStats) -> None:
        if self.training:
            self._update_threshold(kept_vals, stats)

    @torch.no_grad()
    def _update_threshold(self, kept_vals: torch.Tensor, stats: BatchStats = LOCAL) -> None:
        """EMA of the smallest positive activation the batch selection kept (the first batch sets it): the
        JumpReLU threshold that, on average, keeps what BatchTopK kept."""
        lo = stats.min(kept_vals.min() if kept_vals.numel() else torch.full((), torch.inf, device=kept_vals.device))
        if not torch.isfinite(lo):
            return
        self.threshold.copy_(lo if self.threshold <= 0 else torch.lerp(self.threshold, lo, THRESHOLD_EMA))

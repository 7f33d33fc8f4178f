"""JumpReLU SAE: f = pre * H(pre - theta_S), per-latent thresholds trained with straight-through estimators
and an L0 penalty (Rajamanoharan et al. 2024). Trained densely: the threshold's gradient needs the
pre-activations near theta, which the sparse paths do not keep."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchsae.sae.base import SAE, register
from patchsae.sae.config import SAEConfig
from patchsae.sae.kernels import JumpReLUFn, StepFn, mask_to_pairs
from patchsae.sae.losses import LOCAL, BatchStats


@register("jumprelu")
class JumpReLUSAE(SAE):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))

    def activate(self, pre_NS: torch.Tensor, inference: bool = True) -> torch.Tensor:
        return JumpReLUFn.apply(pre_NS, self.log_threshold.exp(), self.cfg.bandwidth)

    @torch.no_grad()
    def _select(self, pre_NS: torch.Tensor, inference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return mask_to_pairs(F.relu(pre_NS), pre_NS > self.log_threshold.exp())

    def loss(self, x_ND: torch.Tensor, dead_S: torch.Tensor | None = None,
             stats: BatchStats = LOCAL, cls_N: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """MSE + l0_coeff * L0, the L0 through the step function's straight-through estimator."""
        xs_ND = x_ND * self.input_scale
        pre_NS = self.pre_acts(x_ND)
        f_NS = self.activate(pre_NS)
        err_ND = self.decode_scaled(f_NS) - xs_ND
        mse = err_ND.pow(2).mean()
        on_NS = f_NS.detach() > 0
        parts = {"mse": mse.detach(), "l0": on_NS.float().sum(-1).mean(), "fired_S": on_NS.any(0)}
        l0 = StepFn.apply(pre_NS, self.log_threshold.exp(), self.cfg.bandwidth).sum(-1).mean()
        return mse + self.cfg.l0_coeff * l0, parts

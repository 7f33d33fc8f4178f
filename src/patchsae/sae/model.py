"""Sparse autoencoders as pure tensor modules: they know nothing of CLIP or images.

ReLU SAE (the paper's):  f = ReLU((x - b_dec) W_enc + b_enc),  x_hat = f W_dec + b_dec
TopK SAE:                f = TopK_k(ReLU((x - b_dec) W_enc + b_enc)), same decoder.
Decoder rows are kept at unit L2 norm, so a latent's activation is its contribution's length.
Inputs are multiplied by `input_scale` (fixed at initialisation so that E||x||^2 = d_model on the first
sample) before encoding and divided after decoding: callers pass and get raw activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchsae import PatchSAEError


@dataclass(frozen=True)
class SAEConfig:
    d_model: int
    d_sae: int
    arch: str = "relu"  # "relu" (L1 penalty) or "topk"
    k: int = 32  # active latents per token, TopK only
    l1_coeff: float = 8e-5  # lambda, ReLU only
    ghost_grads: bool = True  # ReLU only; TopK uses the AuxK loss
    aux_k: int = 0  # TopK auxiliary latents; 0 = d_model // 2
    aux_coeff: float = 1 / 32
    dead_steps: int = 64  # a latent is dead after this many steps without firing

    def __post_init__(self):
        if self.arch not in ("relu", "topk"):
            raise PatchSAEError(f"unknown SAE architecture {self.arch!r} (choose relu or topk)")
        if self.arch == "topk" and not 0 < self.k <= self.d_sae:
            raise PatchSAEError(f"TopK k={self.k} must be in 1..d_sae={self.d_sae}")

    def to_json(self) -> dict:
        return asdict(self)


def geometric_median(points_ND: torch.Tensor, iters: int = 200, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm in float64: the point minimising the sum of Euclidean distances.

    The paper initialises b_dec with it because the mean is pulled by the heavy-tailed outlier tokens."""
    x = points_ND.double()
    m = x.mean(0)
    for _ in range(iters):
        d = (x - m).norm(dim=1).clamp_min(eps)
        w = 1.0 / d
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= 1e-10 * (1 + m.norm()):
            m = new
            break
        m = new
    return m.to(points_ND.dtype)


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        w = torch.empty(cfg.d_sae, cfg.d_model)
        nn.init.kaiming_uniform_(w)
        w = F.normalize(w, dim=1)
        self.W_dec = nn.Parameter(w.clone())  # (d_sae, d_model), unit rows
        # encoder starts as the decoder's transpose, scaled so the initial reconstruction has x's size
        # rather than d_sae / d_model times it
        self.W_enc = nn.Parameter(w.T.clone() * min(1.0, cfg.d_model / cfg.d_sae))  # (d_model, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model))
        self.register_buffer("input_scale", torch.ones(()))

    # ---- initialisation --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_sample(self, x_ND: torch.Tensor) -> None:
        """Fix the input scale and set b_dec to the geometric median of a first sample of activations."""
        x_ND = x_ND.float()
        self.input_scale.fill_((self.cfg.d_model / x_ND.pow(2).sum(1).mean()).sqrt().item())
        self.b_dec.copy_(geometric_median(x_ND * self.input_scale))

    # ---- forward -----------------------------------------------------------------------------------------
    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        return (x_ND * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre_NS: torch.Tensor) -> torch.Tensor:
        f_NS = F.relu(pre_NS)
        if self.cfg.arch == "topk":
            vals, idx = f_NS.topk(self.cfg.k, dim=-1, sorted=False)
            f_NS = torch.zeros_like(f_NS).scatter_(-1, idx, vals)
        return f_NS

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Latent activations f (…, d_sae) of raw activations x (…, d_model)."""
        return self.activate(self.pre_acts(x_ND))

    def decode_scaled(self, f_NS: torch.Tensor) -> torch.Tensor:
        return f_NS @ self.W_dec + self.b_dec

    def decode(self, f_NS: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the raw activation space."""
        return self.decode_scaled(f_NS) / self.input_scale

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_NS = self.encode(x_ND)
        return self.decode(f_NS), f_NS

    # ---- decoder constraint ----------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out of each decoder row's gradient its component along that (unit) row, so the step
        moves along the sphere and renormalising afterwards undoes only second-order drift."""
        if self.W_dec.grad is None:
            return
        parallel_S = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel_S * self.W_dec)

    # ---- losses ---------------------------------------------------------------------------------------------
    def loss(self, x_ND: torch.Tensor, dead_S: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Training loss on raw activations; all terms are means over tokens in the scaled space."""
        xs_ND = x_ND * self.input_scale
        pre_NS = self.pre_acts(x_ND)
        f_NS = self.activate(pre_NS)
        xhat_ND = self.decode_scaled(f_NS)
        err_ND = xhat_ND - xs_ND
        mse = err_ND.pow(2).mean()
        parts = {"mse": mse.detach(), "l0": (f_NS > 0).float().sum(-1).mean().detach()}
        loss = mse
        if self.cfg.arch == "relu":
            l1 = f_NS.abs().sum(-1).mean()
            loss = loss + self.cfg.l1_coeff * l1
            parts["l1"] = l1.detach()
            if self.cfg.ghost_grads and dead_S is not None and dead_S.any():
                ghost = self._ghost_loss(x_ND, err_ND, mse, dead_S)
                loss = loss + ghost
                parts["ghost"] = ghost.detach()
        elif dead_S is not None and dead_S.any():
            aux = self._aux_k_loss(pre_NS, err_ND, dead_S)
            loss = loss + self.cfg.aux_coeff * aux
            parts["aux"] = aux.detach()
        parts["fired_S"] = (f_NS > 0).any(0)
        return loss, parts

    def _ghost_loss(self, x_ND, err_ND, mse, dead_S):
        """Ghost grads: dead latents, with exp() activations, are asked to explain the residual the live
        ones leave, scaled to half its norm; the term is rescaled to the size of the MSE. Gradients reach only
        dead latents' encoder columns, biases and decoder rows."""
        resid_ND = (-err_ND).detach()
        xs_ND = (x_ND * self.input_scale - self.b_dec).detach()
        pre_dead_ND = xs_ND @ self.W_enc[:, dead_S] + self.b_enc[dead_S]
        ghost_out_ND = torch.exp(pre_dead_ND) @ self.W_dec[dead_S]
        scale_N = resid_ND.norm(dim=-1) / (2 * ghost_out_ND.norm(dim=-1) + 1e-6)
        ghost_out_ND = ghost_out_ND * scale_N[:, None].detach()
        ghost_mse = (ghost_out_ND - resid_ND).pow(2).mean()
        return (mse.detach() / (ghost_mse.detach() + 1e-6)) * ghost_mse

    def _aux_k_loss(self, pre_NS, err_ND, dead_S):
        """AuxK (Gao et al. 2024): the top aux_k dead latents reconstruct the main residual, normalised by
        the residual's variance."""
        aux_k = min(self.cfg.aux_k or self.cfg.d_model // 2, int(dead_S.sum()))
        pre_dead_NS = torch.where(dead_S, pre_NS, torch.full_like(pre_NS, -torch.inf))
        vals, idx = pre_dead_NS.topk(aux_k, dim=-1, sorted=False)
        f_aux_NS = torch.zeros_like(pre_NS).scatter_(-1, idx, F.relu(vals))
        resid_ND = (-err_ND).detach()
        recon_ND = f_aux_NS @ self.W_dec
        denom = (resid_ND - resid_ND.mean(0)).pow(2).mean().clamp_min(1e-12)
        return (recon_ND - resid_ND).pow(2).mean() / denom

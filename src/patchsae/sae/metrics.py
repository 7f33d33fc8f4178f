"""Reconstruction and sparsity statistics of an SAE: Table 2's metrics as pure functions of one batch, and
ReconstructionStats, accumulated over batches of images.

Explained variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (the mean over all evaluated tokens),
accumulated in float64 from running sums so a single streaming pass suffices. The reference logs an uncentred
one, 1 - mean ||x - x_hat||^2 / mean ||x||^2, which is higher whenever the activations have a mean far from 0
(as a residual stream does): compare it, not ours, with the reference's logs.
"""

from __future__ import annotations

import torch


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(…, dim) -> (tokens, dim) in float64."""
    return t.double().reshape(-1, t.shape[-1])


def normalized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Table 2's MSE (the reference objective's): mean over (token, dim) of (x_hat - x)^2 / ||x||_2."""
    x, x_hat = _tokens(x), _tokens(x_hat)
    return ((x_hat - x).pow(2) / x.norm(dim=-1, keepdim=True)).mean().item()


def l1(f: torch.Tensor) -> float:
    """Table 2's L1: sum over latents of |f|, averaged over tokens."""
    return _tokens(f).abs().sum(-1).mean().item()


def l0(f: torch.Tensor) -> float:
    """Table 2's L0: active (f > 0, as the reference counts) latents per token."""
    return (_tokens(f) > 0).sum(-1).double().mean().item()


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Ours: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the mean over these tokens."""
    x, x_hat = _tokens(x), _tokens(x_hat)
    return 1.0 - ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def explained_variance_uncentred(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """The reference's: 1 - mean ||x - x_hat||^2 / mean ||x||^2."""
    x, x_hat = _tokens(x), _tokens(x_hat)
    return 1.0 - ((x - x_hat).pow(2).sum() / x.pow(2).sum()).item()


class ReconstructionStats:
    def __init__(self, d_model: int, d_sae: int, dense_threshold: float = 0.1):
        self.sum_x_D = torch.zeros(d_model, dtype=torch.float64)
        self.sum_sq = 0.0  # sum of squared norms of x
        self.sum_err = 0.0  # sum of squared reconstruction errors
        self.n_tokens = 0
        self.n_images = 0
        self.l0_sum = 0.0
        self.l1_sum = 0.0  # sum over tokens of sum |f|
        self.norm_err_sum = 0.0  # sum over tokens of ||x - x_hat||^2 / ||x||
        self.l0_image_sum = 0.0
        self.fires_S = torch.zeros(d_sae, dtype=torch.float64)
        self.d_model = d_model
        self.dense_threshold = dense_threshold

    @torch.no_grad()
    def update(self, x_BTD: torch.Tensor, xhat_BTD: torch.Tensor, f_BTS: torch.Tensor) -> None:
        x = x_BTD.double().reshape(-1, x_BTD.shape[-1])
        self.sum_x_D += x.sum(0).cpu()
        self.sum_sq += x.pow(2).sum().item()
        sq_ND = (xhat_BTD.double().reshape(x.shape) - x).pow(2)
        self.sum_err += sq_ND.sum().item()
        err_N = sq_ND.sum(-1)
        self.norm_err_sum += (err_N / x.norm(dim=-1)).sum().item()
        self.l1_sum += f_BTS.double().abs().sum().item()
        active_BTS = f_BTS > 0
        self.n_tokens += x.shape[0]
        self.n_images += x_BTD.shape[0]
        self.l0_sum += active_BTS.sum().item()
        self.l0_image_sum += active_BTS.any(1).sum().item()
        self.fires_S += active_BTS.sum((0, 1)).double().cpu()

    def frequencies(self) -> torch.Tensor:
        """Fraction of tokens on which each latent fires."""
        return self.fires_S / max(self.n_tokens, 1)

    def table2(self) -> dict:
        """Table 2's metrics over every token seen (see the functions above), and both explained variances."""
        n = max(self.n_tokens, 1)
        sst = self.sum_sq - self.sum_x_D.pow(2).sum().item() / n
        return {"normalized_mse": self.norm_err_sum / (n * self.d_model), "l1": self.l1_sum / n,
                "l0": self.l0_sum / n,
                "explained_variance": 1.0 - self.sum_err / sst if sst > 0 else float("nan"),
                "explained_variance_uncentred": 1.0 - self.sum_err / self.sum_sq if self.sum_sq > 0 else float("nan")}

    def result(self) -> dict:
        n = max(self.n_tokens, 1)
        sst = self.sum_sq - self.sum_x_D.pow(2).sum().item() / n
        freq = self.frequencies()
        return {
            "mse": self.sum_err / (n * self.d_model),
            "explained_variance": 1.0 - self.sum_err / sst if sst > 0 else float("nan"),
            "l0_per_token": self.l0_sum / n,
            "l0_per_image": self.l0_image_sum / max(self.n_images, 1),
            "dead_fraction": (freq == 0).double().mean().item(),
            "dense_fraction": (freq > self.dense_threshold).double().mean().item(),
            "dense_threshold": self.dense_threshold,
            "n_tokens": self.n_tokens,
            "n_images": self.n_images,
        }

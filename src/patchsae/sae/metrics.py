"""Reconstruction and sparsity statistics of an SAE, accumulated over batches of images.

Explained variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (the mean over all evaluated tokens),
accumulated in float64 from running sums so a single streaming pass suffices.
"""

from __future__ import annotations

import torch


class ReconstructionStats:
    def __init__(self, d_model: int, d_sae: int, dense_threshold: float = 0.1):
        self.sum_x_D = torch.zeros(d_model, dtype=torch.float64)
        self.sum_sq = 0.0  # sum of squared norms of x
        self.sum_err = 0.0  # sum of squared reconstruction errors
        self.n_tokens = 0
        self.n_images = 0
        self.l0_sum = 0.0
        self.l0_image_sum = 0.0
        self.fires_S = torch.zeros(d_sae, dtype=torch.float64)
        self.d_model = d_model
        self.dense_threshold = dense_threshold

    @torch.no_grad()
    def update(self, x_BTD: torch.Tensor, xhat_BTD: torch.Tensor, f_BTS: torch.Tensor) -> None:
        x = x_BTD.double().reshape(-1, x_BTD.shape[-1])
        self.sum_x_D += x.sum(0).cpu()
        self.sum_sq += x.pow(2).sum().item()
        self.sum_err += (xhat_BTD.double().reshape(x.shape) - x).pow(2).sum().item()
        active_BTS = f_BTS > 0
        self.n_tokens += x.shape[0]
        self.n_images += x_BTD.shape[0]
        self.l0_sum += active_BTS.sum().item()
        self.l0_image_sum += active_BTS.any(1).sum().item()
        self.fires_S += active_BTS.sum((0, 1)).double().cpu()

    def frequencies(self) -> torch.Tensor:
        """Fraction of tokens on which each latent fires."""
        return self.fires_S / max(self.n_tokens, 1)

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

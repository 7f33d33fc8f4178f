"""Sparse autoencoders as pure tensor modules: they know nothing of CLIP or images.

The public face of `patchsae.sae`: `SAE(cfg)` builds the type registered for `cfg.arch`, one module each:
  relu.py      ReLU + L1 (the paper's), ghost grads        f = ReLU((x - b_dec) W_enc + b_enc)
               under the "scaled" or the reference code's objective (ReferenceReLUSAE)
  topk.py      TopK and BatchTopK, AuxK                    f = TopK_k(ReLU(pre)); batch-wide top (tokens x k)
  jumprelu.py  JumpReLU, L0 with straight-through theta    f = pre * H(pre - theta_S)
Every variant decodes x_hat = f W_dec + b_dec with unit-norm decoder rows, so a latent's activation is its
contribution's length. base.py holds what they share, kernels.py the fast autograd Functions and workspaces,
losses.py the auxiliary losses, config.py SAEConfig.
"""

from __future__ import annotations

from patchsae.sae import jumprelu, relu, topk  # noqa: F401  (each registers its variant)
from patchsae.sae.base import SAE, VARIANTS, geometric_median, variant
from patchsae.sae.config import ARCHS, OBJECTIVES, TOPK_FAMILY, SAEConfig
from patchsae.sae.jumprelu import JumpReLUSAE
from patchsae.sae.losses import LOCAL, BatchStats
from patchsae.sae.relu import ReferenceReLUSAE, ReLUSAE
from patchsae.sae.topk import BatchTopKSAE, TopKSAE

__all__ = ["ARCHS", "LOCAL", "OBJECTIVES", "TOPK_FAMILY", "VARIANTS", "BatchStats", "BatchTopKSAE", "JumpReLUSAE",
           "ReLUSAE", "ReferenceReLUSAE", "SAE", "SAEConfig", "TopKSAE", "geometric_median", "variant"]

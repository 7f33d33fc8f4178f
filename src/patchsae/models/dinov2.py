"""DINOv2 (transformers `Dinov2Model`, and `Dinov2WithRegistersModel`) as a backbone: a class token, then the
register tokens of the with-registers variants (their own token kind), then the patches. No text tower: the image
features are the final layer-normed class token (HF's pooler output), for a linear probe to classify."""

from __future__ import annotations


import torch

from patchsae import PatchSAEError
from patchsae.models.backbone import TokenLayout
from patchsae.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from patchsae.models.vit import HFViT

# what the hub's DINOv2 folders say (BitImageProcessor): short side 256, centre crop 224, ImageNet mean/std
DEFAULT_PREPROCESS = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, shortest_edge=256)


class Dinov2Backbone(HFViT):
    """`hf` is a `Dinov2Model` or `Dinov2WithRegistersModel`; the residual stream after block L equals its
    hidden_states[L+1]. DINOv2 interpolates its position embeddings, so the grid is the preprocessed image side
    over the patch size (224 / 14 = 16 for the hub models, whose config says image_size 518)."""

    def __init__(self, hf_model, preprocess: Preprocess, name: str):
        self.hf = hf_model.eval()
        self.preprocess = preprocess
        self.name = name
        self.templates = ()
        patch = self.hf.config.patch_size
        if preprocess.size % patch:
            raise PatchSAEError(f"{name}: the {preprocess.size}px input is not a whole number of {patch}px patches")
        for p in self.hf.parameters():
            p.requires_grad_(False)

    @property
    def blocks(self):
        return self.hf.encoder.layer

    @property
    def d_model(self) -> int:
        return self.hf.config.hidden_size

    def layout(self) -> TokenLayout:
        side = self.preprocess.size // self.hf.config.patch_size
        n_reg = int(getattr(self.hf.config, "num_register_tokens", 0) or 0)
        return TokenLayout(n_cls=1, n_prompt=0, grid=(side, side), n_register=n_reg)

    def _embed(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        return self.hf.embeddings(pixels_BCHW.to(self.device))

    def _pool(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.hf.layernorm(h_BTD[:, 0])  # LayerNorm is per token: the CLS row of layernorm(all tokens)


"""DINOv2 (transformers `Dinov2Model`, and `Dinov2WithRegistersModel`) as a backbone: a class token, then the
register tokens of the with-registers variants (their own token kind), then the patches. No text tower: the image
features are the final layer-normed class token (HF's pooler output), for a linear probe to classify."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from patchsae import PatchSAEError
from patchsae.models.backbone import TokenLayout
from patchsae.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, preprocess_from_folder
from patchsae.models.vit import HFViT


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


_DINOV2_TYPES = ("dinov2", "dinov2_with_registers")


def load_dinov2(folder: str | Path, name: str, device: str = "cpu") -> Dinov2Backbone:
    """A local DINOv2 folder (config.json with model_type "dinov2" or "dinov2_with_registers", weights,
    preprocessor config)."""
    from transformers import AutoConfig, Dinov2Model, Dinov2WithRegistersModel

    try:
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if cfg.model_type not in _DINOV2_TYPES:
            raise PatchSAEError(f"{folder}: model_type {cfg.model_type!r} is not DINOv2")
        cls = Dinov2WithRegistersModel if cfg.model_type == "dinov2_with_registers" else Dinov2Model
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PatchSAEError(f"{folder}: not a loadable DINOv2 folder ({str(exc).splitlines()[0][:200]})") from None
    default = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, shortest_edge=256)  # the hub models' own config
    return Dinov2Backbone(model.to(device), preprocess_from_folder(folder, 224, default), name)

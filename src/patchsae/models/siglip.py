"""SigLIP (transformers `SiglipModel`) as a backbone: every token is a patch (no class token; the image embedding
is an attention-pooling head over the patches), a text tower, and the sigmoid zero-shot head with its learnt
bias: p(class | image) = sigmoid(exp(logit_scale) * cos + logit_bias)."""

from __future__ import annotations

from typing import Sequence

import torch

from patchsae import PatchSAEError
from patchsae.models.preprocess import Preprocess
from patchsae.models.vit import HFImageText


class SiglipBackbone(HFImageText):
    """`hf` is a `SiglipModel`; the residual stream after block L equals its vision tower's hidden_states[L+1]."""

    N_CLS = 0  # every token is a patch

    def __init__(self, hf_model, tokenizer, preprocess: Preprocess, name: str, templates: Sequence[str]):
        if not getattr(hf_model.config.vision_config, "vision_use_head", True):
            raise PatchSAEError(f"{name}: a SigLIP vision tower without its pooling head has no image embedding")
        super().__init__(hf_model, tokenizer, preprocess, name, templates)

    def _embed(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        return self.vision.embeddings(pixels_BCHW.to(self.device))

    def _pool(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.vision.head(self.vision.post_layernorm(h_BTD))

    # ---- zero-shot head -----------------------------------------------------------------------------------
    @property
    def logit_bias(self) -> float:
        return float(self.hf.logit_bias)

    @torch.no_grad()
    def zero_shot_probs(self, image_features_BE: torch.Tensor, head_CE: torch.Tensor) -> torch.Tensor:
        """Independent per-class probabilities (SigLIP's sigmoid), not a softmax over the classes."""
        return torch.sigmoid(self.logit_scale * self.logits(image_features_BE, head_CE).float() + self.logit_bias)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unnormalised text embeddings (prompts, width). SigLIP was trained on text padded to its full context
        and pools the last position, so prompts are padded to max_length (no attention mask), as it expects."""
        n_ctx = self.hf.config.text_config.max_position_embeddings
        outs = []
        for i in range(0, len(prompts), batch_size):
            tok = self.tokenizer(list(prompts[i: i + batch_size]), padding="max_length", max_length=n_ctx,
                                 truncation=True, return_tensors="pt")
            out = self.hf.get_text_features(input_ids=tok["input_ids"].to(self.device))
            outs.append(out.pooler_output if hasattr(out, "pooler_output") else out)
        return torch.cat(outs)


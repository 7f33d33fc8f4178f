"""CLIP (a Hugging Face `CLIPModel`; OpenAI-layout checkpoints are converted into one on load) as a backbone:
CLS + patch tokens, a text tower, and the zero-shot head at CLIP's learnt logit scale."""

from __future__ import annotations

from typing import Sequence

import torch

from patchsae.models.backbone import Finisher, TokenLayout  # noqa: F401 - TokenLayout re-exported
from patchsae.models.finish import cls_only_finisher
from patchsae.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess  # noqa: F401 - re-exported
from patchsae.models.vit import HFImageText


class ClipModel(HFImageText):
    """A CLIP vision-language model with block-level access to the vision tower's residual stream. The residual
    stream "after block L" equals HF's `hidden_states[L + 1]`. `hf`, `vision` and `blocks` are for models/ (and
    tests) only. Built as ClipModel(hf_model, tokenizer, preprocess, name, templates)."""

    # ---- vision ---------------------------------------------------------------------------------------
    def _embed(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        h_BTD = self.vision.embeddings(pixels_BCHW.to(self.device))
        return self.vision.pre_layrnorm(h_BTD)

    def _head(self, cls_BD: torch.Tensor) -> torch.Tensor:
        """Final CLS row -> image features: post-layernorm, then the visual projection."""
        return self.hf.visual_projection(self.vision.post_layernorm(cls_BD))

    def _pool(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self._head(h_BTD[:, 0])

    def fast_finisher(self, layer: int) -> Finisher | None:
        start = self.resolve_layer(layer) + 1
        if start < self.plain_blocks_start():
            return None
        return cls_only_finisher(self.blocks[start:], self._head, self.device)

    # ---- text ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unnormalised text embeddings (prompts, projection_dim)."""
        outs = []
        for i in range(0, len(prompts), batch_size):
            tok = self.tokenizer(
                list(prompts[i: i + batch_size]), padding=True, truncation=True, return_tensors="pt"
            )
            out = self.hf.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
            outs.append(out.pooler_output if hasattr(out, "pooler_output") else out)
        return torch.cat(outs)

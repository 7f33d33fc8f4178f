"""One interface over a CLIP model: preprocessing, image and text towers, and access to one block's
residual stream (read it with early exit, or replace it while the forward pass finishes).

The wrapped model is a Hugging Face `CLIPModel`; other checkpoint formats are converted into one on load.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from patchsae.models.backbone import Backbone, Finisher, TokenLayout
from patchsae.models.finish import cls_only_finisher

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """CLIP's image preprocessing without torchvision: RGB, resize the short side (bicubic), centre-crop,
    scale to [0, 1], normalise with mean/std."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def image(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        w, h = img.size
        scale = self.size / min(w, h)
        if (w, h) != (self.size, self.size):
            # the centre crop's region in source pixels, resized straight to size x size: resizing the whole
            # image first held all of it at the new scale (a 1 x 60,000 PNG of a few KB became 28 x 1.7 M);
            # identical for square images, at most one level of 255 apart on a few pixels otherwise
            new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            sx, sy = w / new_w, h / new_h
            img = img.resize((self.size, self.size), Image.BICUBIC,
                             box=(left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        x_HWC = torch.from_numpy(arr)
        x_HWC = (x_HWC - torch.tensor(self.mean)) / torch.tensor(self.std)
        return x_HWC.permute(2, 0, 1).contiguous()

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.image(im) for im in images])


class ClipModel(Backbone):
    """A CLIP vision-language model (HF `CLIPModel`) as a `Backbone`: CLS + patch tokens, text tower, zero-shot
    head at CLIP's learnt logit scale. The residual stream "after block L" equals HF's `hidden_states[L + 1]`.
    `hf`, `vision` and `blocks` are for models/ (and tests) only."""

    def __init__(self, hf_model, tokenizer, preprocess: Preprocess, name: str, templates: Sequence[str]):
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.templates = tuple(templates)
        for p in self.hf.parameters():
            p.requires_grad_(False)

    # ---- shapes -------------------------------------------------------------------------------------------
    @property
    def vision(self):
        return self.hf.vision_model

    @property
    def blocks(self):
        return self.vision.encoder.layers

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.hf.config.vision_config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def layout(self) -> TokenLayout:
        cfg = self.hf.config.vision_config
        side = cfg.image_size // cfg.patch_size
        return TokenLayout(n_cls=1, n_prompt=0, grid=(side, side))

    # ---- vision ---------------------------------------------------------------------------------------
    def _embed(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        h_BTD = self.vision.embeddings(pixels_BCHW.to(self.device))
        return self.vision.pre_layrnorm(h_BTD)

    @torch.no_grad()
    def block_output(self, pixels_BCHW: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """Residual stream after block `layer` at every token, shape (batch, tokens, width).

        Stops the forward pass there: the blocks above are never run."""
        last = self.resolve_layer(layer)
        h_BTD = self._embed(pixels_BCHW)
        for block in self.blocks[: last + 1]:
            h_BTD = block(h_BTD, None)
        return h_BTD

    def _head(self, cls_BD: torch.Tensor) -> torch.Tensor:
        """Final CLS row -> image features: post-layernorm, then the visual projection."""
        return self.hf.visual_projection(self.vision.post_layernorm(cls_BD))

    def _finish(self, h_BTD: torch.Tensor, start: int) -> torch.Tensor:
        for block in self.blocks[start:]:
            h_BTD = block(h_BTD, None)
        return self._head(h_BTD[:, 0])

    @torch.no_grad()
    def image_features(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (batch, projection_dim)."""
        return self._finish(self._embed(pixels_BCHW), 0)

    def fast_finisher(self, layer: int) -> Finisher | None:
        start = self.resolve_layer(layer) + 1
        if start < self.plain_blocks_start():
            return None
        return cls_only_finisher(self.blocks[start:], self._head, self.device)

    @torch.no_grad()
    def finish_from(self, h_BTD: torch.Tensor, layer: int) -> torch.Tensor:
        """Image embeddings computed from the residual stream after block `layer` (the rest of the tower)."""
        return self._finish(h_BTD.to(self.device), self.resolve_layer(layer) + 1)

    @contextmanager
    def replace_block_output(
        self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[None]:
        """Within the block, every forward pass replaces block `layer`'s output h_BTD by fn(h_BTD).

        The generic splice point for SAEs and ablations; the hook is removed on exit, even on error."""
        block = self.blocks[self.resolve_layer(layer)]
        handle = block.register_forward_hook(lambda _m, _inp, out: fn(out))
        try:
            yield
        finally:
            handle.remove()

    # ---- zero-shot head, frozen weights ---------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        return True

    @property
    def logit_scale(self) -> float:
        return float(self.hf.logit_scale.exp())

    def frozen_parameters(self) -> list[torch.Tensor]:
        return list(self.hf.parameters())

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

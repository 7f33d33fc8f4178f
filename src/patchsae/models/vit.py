"""The part of the backbone interface every transformers ViT tower shares: embed, run blocks, pool.

A family (CLIP, SigLIP, DINOv2) supplies three things: `_embed` (pixels -> the tokens entering block 0, as the
library's own `hidden_states[0]`), `blocks` (the encoder layers, each called as `block(h_BTD, None)` and returning
the residual stream), and `_pool` (the last block's output -> image features). Block output, finishing the
forward pass from any block, and splicing then follow here once for all of them.
"""

from __future__ import annotations

from abc import abstractmethod
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from patchsae.models.backbone import Backbone, TokenLayout


class HFViT(Backbone):
    """A backbone over a transformers vision tower (`self.hf` is the library model; models/ only)."""

    hf: nn.Module

    @property
    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The vision tower's transformer blocks, in order."""

    @abstractmethod
    def _embed(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """Pixels -> tokens entering block 0 (B, T, D), on the model's device."""

    @abstractmethod
    def _pool(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last block -> image features (B, E)."""

    def _run_blocks(self, h_BTD: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks start..stop-1 (adapted models override this to inject tokens between blocks)."""
        for block in self.blocks[start:stop]:
            h_BTD = block(h_BTD, None)
        return h_BTD

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @torch.no_grad()
    def block_output(self, pixels_BCHW: torch.Tensor, layer: int = -2) -> torch.Tensor:
        return self._run_blocks(self._embed(pixels_BCHW), 0, self.resolve_layer(layer) + 1)

    @torch.no_grad()
    def block_outputs(self, pixels_BCHW: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """One pass up to the deepest block, keeping each block's output on the way: the same operations as
        `block_output` per layer, so the results are bitwise equal to it."""
        resolved = [self.resolve_layer(layer) for layer in layers]
        h_BTD, done, kept = self._embed(pixels_BCHW), 0, {}
        for stop in sorted(set(resolved)):
            h_BTD, done = self._run_blocks(h_BTD, done, stop + 1), stop + 1
            kept[stop] = h_BTD
        return [kept[layer] for layer in resolved]

    def _finish(self, h_BTD: torch.Tensor, start: int) -> torch.Tensor:
        return self._pool(self._run_blocks(h_BTD, start, self.n_layers))

    @torch.no_grad()
    def finish_from(self, h_BTD: torch.Tensor, layer: int) -> torch.Tensor:
        return self._finish(h_BTD.to(self.device), self.resolve_layer(layer) + 1)

    @torch.no_grad()
    def image_features(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        return self._finish(self._embed(pixels_BCHW), 0)

    @contextmanager
    def replace_block_output(self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        block = self.blocks[self.resolve_layer(layer)]
        handle = block.register_forward_hook(lambda _m, _inp, out: fn(out))
        try:
            yield
        finally:
            handle.remove()

    def frozen_parameters(self) -> list[torch.Tensor]:
        return list(self.hf.parameters())


class HFImageText(HFViT):
    """A transformers image-text model (`hf.vision_model` + a text tower: CLIP, SigLIP) with `N_CLS` class tokens
    before the patch grid; the vision config's image size fixes the grid (no position interpolation)."""

    N_CLS: int = 1

    def __init__(self, hf_model, tokenizer, preprocess, name: str, templates: Sequence[str]):
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.templates = tuple(templates)
        for p in self.hf.parameters():
            p.requires_grad_(False)

    @property
    def vision(self):
        return self.hf.vision_model

    @property
    def blocks(self):
        return self.vision.encoder.layers

    @property
    def d_model(self) -> int:
        return self.hf.config.vision_config.hidden_size

    def layout(self) -> TokenLayout:
        cfg = self.hf.config.vision_config
        side = cfg.image_size // cfg.patch_size
        return TokenLayout(n_cls=self.N_CLS, n_prompt=0, grid=(side, side))

    @property
    def has_text(self) -> bool:
        return True

    @property
    def logit_scale(self) -> float:
        return float(self.hf.logit_scale.exp())

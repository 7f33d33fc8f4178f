"""The backbone interface: a vision transformer whose residual stream can be read and replaced block by block,
with an optional text tower for zero-shot heads and concept names.

Everything outside `models/` talks to a model through this interface only (never through the wrapped library
model), so a new family (SigLIP, DINOv2, ...) is one subclass here and every stage runs on it unchanged.

Block indices: `layer` arguments are block indices, negative ones counting from the end (-2 = the paper's
block 11 of 12); "the residual stream after block L" is what the tower's own `hidden_states[L + 1]` holds.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from patchsae import PatchSAEError

Finisher = Callable[[torch.Tensor], torch.Tensor]  # residual stream after a block -> image features (B, E)


@dataclass(frozen=True)
class TokenLayout:
    """Which row of a block's output is which token: class tokens first, then register tokens (DINOv2 with
    registers), then visual prompt tokens (MaPLe adds them), then the patch grid in row-major order."""

    n_cls: int  # class tokens at the start (1 for CLIP and DINOv2, 0 for SigLIP)
    n_prompt: int  # learnt prompt tokens (0 unless the model is adapted)
    grid: tuple[int, int]  # patch grid (rows, columns)
    n_register: int = 0  # register tokens after the class token (DINOv2 with registers: 4)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_cls + self.n_register + self.n_prompt + self.n_patches

    def kinds(self) -> list[str]:
        return (["cls"] * self.n_cls + ["register"] * self.n_register + ["prompt"] * self.n_prompt
                + ["patch"] * self.n_patches)

    def image_token_mask(self) -> torch.Tensor:
        """True for CLS and patch tokens: the tokens an SAE trained on the frozen model sees (prompt and register
        tokens are kept apart)."""
        return torch.tensor([k in ("cls", "patch") for k in self.kinds()])

    def to_json(self) -> dict:
        out = {"n_cls": self.n_cls, "n_prompt": self.n_prompt, "grid": list(self.grid), "kinds": self.kinds()}
        return {**out, "n_register": self.n_register} if self.n_register else out  # older runs: no key


class Backbone(ABC):
    """A vision transformer with block-level access to its residual stream, plus an optional text tower.

    Attributes every backbone sets: `name` (what runs record as the model), `preprocess` (PIL images ->
    pixels (B, C, H, W) as this model expects them), `templates` (prompt templates for zero-shot heads).
    """

    name: str
    preprocess: Callable
    templates: tuple[str, ...]

    # ---- shapes ---------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def d_model(self) -> int:
        """Width of the residual stream (what an SAE on it reads)."""

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Number of transformer blocks in the vision tower."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the weights live; inputs are moved there."""

    @abstractmethod
    def layout(self) -> TokenLayout:
        """Which row of `block_output` is which token kind."""

    def resolve_layer(self, layer: int) -> int:
        """Map a possibly negative block index to 0..n_layers-1, or fail with one clear message."""
        if not -self.n_layers <= layer < self.n_layers:
            raise PatchSAEError(
                f"layer {layer} does not exist: {self.name} has {self.n_layers} blocks "
                f"(valid: {-self.n_layers}..{self.n_layers - 1})"
            )
        return layer % self.n_layers

    # ---- vision ---------------------------------------------------------------------------------------------
    @abstractmethod
    def block_output(self, pixels_BCHW: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """Residual stream after block `layer` at every token, (batch, tokens, d_model); the blocks above are
        never run (early exit)."""

    def block_outputs(self, pixels_BCHW: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """`block_output` at each of `layers`; a backbone that can keep every block's output from one pass
        overrides this (extracting several layers then costs one forward pass)."""
        return [self.block_output(pixels_BCHW, layer) for layer in layers]

    @abstractmethod
    def finish_from(self, h_BTD: torch.Tensor, layer: int) -> torch.Tensor:
        """Image features computed from the residual stream after block `layer` (the rest of the tower, its
        pooling and projection): `finish_from(block_output(x, L), L) == image_features(x)`."""

    @abstractmethod
    def image_features(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (batch, E), projected into the space the text head lives in."""

    @abstractmethod
    def replace_block_output(self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]
                             ) -> AbstractContextManager[None]:
        """Context manager: within it, every forward pass replaces block `layer`'s output h_BTD by fn(h_BTD).
        The splice point for SAEs and ablations; the replacement is removed on exit, even on error."""

    def plain_blocks_start(self) -> int:
        """The first block from which the tower runs its blocks as they are, nothing injected between them.

        0 for a frozen backbone; an adapted model that inserts tokens before its early blocks (MaPLe) returns
        the first block past them. A fast finisher may run only blocks from here on itself."""
        return 0

    def fast_finisher(self, layer: int) -> Finisher | None:
        """The same computation as `finish_from(., layer)` with the last block run for the pooled query only,
        or None where this backbone has none (or blocks after `layer` are not plain). Callers get it through
        `finisher`, which checks it first."""
        return None

    def finisher(self, layer: int, sample_h_BTD: torch.Tensor) -> tuple[Finisher, bool]:
        """(h_BTD -> image features, fast?): `fast_finisher(layer)` if it matches `finish_from` on
        `sample_h_BTD` (relative 1e-4), else `finish_from` itself."""
        slow = lambda h: self.finish_from(h, layer)  # noqa: E731
        fast = self.fast_finisher(layer)
        if fast is None:
            return slow, False
        with torch.no_grad():
            want, got = slow(sample_h_BTD), fast(sample_h_BTD)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max().clamp_min(1e-6))):
            return slow, False
        return fast, True

    # ---- zero-shot head ---------------------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        """Whether the backbone has a text tower (zero-shot heads, concept names from text)."""
        return False

    @property
    def logit_scale(self) -> float:
        """Multiplier turning `logits` (cosine similarities) into the model's own softmax logits."""
        raise PatchSAEError(f"{self.name} has no text tower, so no zero-shot logit scale")

    @property
    def logit_bias(self) -> float:
        """Added to the scaled logits before the model's own link function (SigLIP learns one; CLIP has none)."""
        return 0.0

    @torch.no_grad()
    def zero_shot_probs(self, image_features_BE: torch.Tensor, head_CE: torch.Tensor) -> torch.Tensor:
        """Class probabilities (batch, classes) as the model itself computes them: CLIP's softmax over the
        classes at its logit scale (SigLIP overrides this with its per-class sigmoid)."""
        return torch.softmax(self.logit_scale * self.logits(image_features_BE, head_CE).float(), -1)

    def text_features(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unnormalised text embeddings (prompts, E)."""
        raise PatchSAEError(f"{self.name} has no text tower")

    @torch.no_grad()
    def text_head(self, class_names: Sequence[str], templates: Sequence[str] | None = None,
                  renormalise: bool = True) -> torch.Tensor:
        """Zero-shot classifier (classes, E): per class, the normalised mean of the normalised embeddings of its
        prompts (CLIP's prompt ensembling). renormalise=False keeps the plain mean, as the reference code's
        masking experiment does (a class whose prompts disagree then gets a shorter, weaker row)."""
        templates = tuple(templates or self.templates)
        prompts = [t.format(c) for c in class_names for t in templates]
        emb_PE = F.normalize(self.text_features(prompts), dim=-1)
        mean_CE = emb_PE.view(len(class_names), len(templates), -1).mean(1)
        return F.normalize(mean_CE, dim=-1) if renormalise else mean_CE

    @torch.no_grad()
    def logits(self, image_features_BE: torch.Tensor, head_CE: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each image to each class (batch, classes); argmax is the prediction."""
        return F.normalize(image_features_BE, dim=-1) @ head_CE.to(image_features_BE.device).T

    # ---- frozen weights -------------------------------------------------------------------------------------
    @abstractmethod
    def frozen_parameters(self) -> list[torch.Tensor]:
        """The backbone's own (frozen) weights, without anything an adaptation learns."""

    def frozen_fingerprint(self) -> str:
        """A digest of every frozen weight's bytes: equal before and after prompt training proves no backbone
        weight moved (a sum could hide swapped or cancelling changes)."""
        h = hashlib.blake2b(digest_size=16)
        for p in self.frozen_parameters():
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

"""Shuffled token batches for SAE training, from the cache or extracted on the fly.

Both sources are deterministic per step: the batch at step s depends only on (seed, s), so a resumed run
gets exactly the batches it would have had, and every selected token appears once per epoch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from patchsae import PatchSAEError
from patchsae.activations.cache import ActivationCache

TOKEN_SETS = {"all": ("cls", "patch"), "patch": ("patch",), "cls": ("cls",)}


def token_positions(kinds: list[str], tokens: str) -> np.ndarray:
    """Positions of the token rows to train on; visual prompt tokens are never in the default set."""
    if tokens not in TOKEN_SETS:
        raise PatchSAEError(f"unknown token set {tokens!r} (choose from {', '.join(TOKEN_SETS)})")
    return np.array([i for i, k in enumerate(kinds) if k in TOKEN_SETS[tokens]], dtype=np.int64)


class CachedTokens:
    def __init__(self, cache: ActivationCache, tokens: str = "all", seed: int = 0):
        self.cache = cache
        self.positions = token_positions(cache.kinds, tokens)
        self.seed = seed
        self.n_tokens = cache.n_images * len(self.positions)
        if self.n_tokens == 0:
            raise PatchSAEError(f"the cache in {cache.folder} holds no tokens of the selected kind")
        self._perm_epoch, self._perm = -1, None

    def _gather(self, ids: np.ndarray) -> torch.Tensor:
        ids = np.sort(ids)
        p = len(self.positions)
        return torch.from_numpy(self.cache.rows(ids // p, self.positions[ids % p]).astype(np.float32))

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            dtype = np.int32 if self.n_tokens < 2**31 else np.int64
            self._perm, self._perm_epoch = rng.permutation(self.n_tokens).astype(dtype), epoch
        return self._perm

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.n_tokens // batch_size)

    def sample(self, n: int) -> torch.Tensor:
        """A fixed random sample of n tokens (independent of the training order)."""
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        return self._gather(rng.choice(self.n_tokens, size=min(n, self.n_tokens), replace=False))

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        per_epoch = self.steps_per_epoch(batch_size)
        step = start_step
        while True:
            epoch, b = divmod(step, per_epoch)
            yield self._gather(self._permutation(epoch)[b * batch_size: (b + 1) * batch_size])
            step += 1


class StreamedTokens:
    """On-the-fly extraction with no cache: each step runs the model on a deterministic set of images and
    takes a shuffled selection of their tokens. Slower per token; for one-off runs and huge datasets."""

    def __init__(self, model, ds, layer: int, tokens: str = "all", seed: int = 0, images_per_step: int = 0):
        self.model, self.ds, self.layer, self.seed = model, ds, model.resolve_layer(layer), seed
        self.positions = token_positions(model.layout().kinds(), tokens)
        self.n_tokens = len(ds) * len(self.positions)
        self.images_per_step = images_per_step

    def _tokens_of(self, indices) -> torch.Tensor:
        from patchsae.data.base import iter_batches

        out = []
        for pixels, _, _ in iter_batches(self.ds, self.model.preprocess, 256, indices):
            h_BTD = self.model.block_output(pixels, self.layer)
            out.append(h_BTD[:, torch.from_numpy(self.positions)].reshape(-1, h_BTD.shape[-1]))
        if not out:
            return torch.empty(0, self.model.d_model)
        return torch.cat(out).float()

    def sample(self, n: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        per_image = len(self.positions)
        imgs = rng.choice(len(self.ds), size=min(len(self.ds), -(-n // per_image)), replace=False)
        return self._tokens_of(np.sort(imgs))[:n]

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Each step takes the next n_img images of the epoch's permutation (the epoch's remainder is
        dropped, so every batch is full); a step that lost images to decode errors is topped up from the
        images after the epoch's last full step."""
        per_image = len(self.positions)
        n_img = max(self.images_per_step, -(-batch_size // per_image))
        per_epoch = len(self.ds) // n_img
        if per_epoch == 0:
            raise PatchSAEError(f"{self.ds.name} has {len(self.ds)} images; a batch of {batch_size} tokens "
                                f"needs {n_img}")
        step = start_step
        while True:
            epoch, b = divmod(step, per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))
            x_ND = self._tokens_of(np.sort(order[b * n_img: (b + 1) * n_img]))
            spare = iter(order[per_epoch * n_img:])
            while len(x_ND) < batch_size:
                nxt = next(spare, None)
                if nxt is None:
                    raise PatchSAEError(f"too many unreadable images in {self.ds.name} to fill a batch")
                x_ND = torch.cat([x_ND, self._tokens_of([int(nxt)])])
            pick = np.random.default_rng([self.seed, epoch, b]).permutation(len(x_ND))[:batch_size]
            yield x_ND[torch.from_numpy(pick)]
            step += 1

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
from patchsae.activations.precision import autocast, check_dtype

# DINOv2's register tokens are kept apart by default (like visual prompt tokens): they hold global scratch state,
# not image content at a place, so only the sets that name them train on them
TOKEN_SETS = {"all": ("cls", "patch"), "patch": ("patch",), "cls": ("cls",), "register": ("register",),
              "all+register": ("cls", "register", "patch")}


def token_positions(kinds: list[str], tokens: str) -> np.ndarray:
    """Positions of the token rows to train on; visual prompt tokens are never in a set, register tokens only in
    the sets that name them."""
    if tokens not in TOKEN_SETS:
        raise PatchSAEError(f"unknown token set {tokens!r} (choose from {', '.join(TOKEN_SETS)})")
    if "register" in TOKEN_SETS[tokens] and "register" not in kinds:
        raise PatchSAEError(f"--tokens {tokens} asks for register tokens, but this model has none (only DINOv2 "
                            "with registers does)")
    return np.array([i for i, k in enumerate(kinds) if k in TOKEN_SETS[tokens]], dtype=np.int64)



def token_mask(kinds: list[str], tokens: str) -> torch.Tensor:
    """(len(kinds),) bool: the rows of a block's output that the token set selects (token_positions as a mask;
    for "all" the same rows as TokenLayout.image_token_mask)."""
    mask = torch.zeros(len(kinds), dtype=torch.bool)
    mask[torch.from_numpy(token_positions(kinds, tokens))] = True
    return mask

def cls_positions(kinds: list[str], positions: np.ndarray) -> np.ndarray:
    """(len(positions),) bool: which of the selected positions is a CLS token (the reference objective
    weights their error by mse_cls_coefficient)."""
    return np.array([kinds[q] == "cls" for q in positions], dtype=bool)


CHUNK_IMAGES = 16  # images whose tokens stay together in the first shuffle level (contiguous on disk)
WINDOW_CHUNKS = 256  # chunks whose tokens are shuffled together in the second level


class CachedTokens:
    """Token batches from the cache in a two-level shuffle, so no permutation of all tokens is ever held
    (250 M tokens would need 1-2 GB): each epoch permutes chunks of CHUNK_IMAGES consecutive images, cuts that
    order into windows of WINDOW_CHUNKS chunks (4,096 images here; 807 k tokens at ViT-B/16) and permutes the
    tokens inside each window. A batch therefore mixes tokens of hundreds of images from anywhere in the cache,
    the reads inside a chunk are contiguous, and memory is O(images / CHUNK_IMAGES + window tokens).

    Batch s depends only on (seed, s); `batches(..., rank, world)` yields rank's slice of each global batch,
    so ranks of a distributed run together see exactly the tokens one process would."""

    def __init__(self, cache: ActivationCache, tokens: str = "all", seed: int = 0, chunk_images: int = CHUNK_IMAGES,
                 window_chunks: int = WINDOW_CHUNKS):
        self.cache = cache
        self.positions = token_positions(cache.kinds, tokens)
        self.cls_P = cls_positions(cache.kinds, self.positions)
        self.seed = seed
        self.n_tokens = cache.n_images * len(self.positions)
        if self.n_tokens == 0:
            raise PatchSAEError(f"the cache in {cache.folder} holds no tokens of the selected kind")
        self.chunk_images, self.window_chunks = chunk_images, window_chunks
        self.n_chunks = -(-cache.n_images // chunk_images)
        self._epoch, self._order, self._window_starts = -1, None, None
        self._windows: dict[int, np.ndarray] = {}

    def _gather(self, ids: np.ndarray) -> torch.Tensor:
        """Rows of the given token ids, which must be sorted (reads then run forward through the shards)."""
        p = len(self.positions)
        return torch.from_numpy(self.cache.rows(ids // p, self.positions[ids % p]).astype(np.float32))

    def _plan(self, epoch: int) -> None:
        """The epoch's chunk order and the token offset at which each window starts."""
        if epoch == self._epoch:
            return
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
        sizes = np.minimum(self.chunk_images, self.cache.n_images - order * self.chunk_images) * len(self.positions)
        ends = np.cumsum(sizes)[self.window_chunks - 1:: self.window_chunks]
        if len(ends) == 0 or ends[-1] != self.n_tokens:
            ends = np.append(ends, self.n_tokens)
        self._epoch, self._order, self._window_starts, self._windows = epoch, order, np.concatenate([[0], ends]), {}

    def _window(self, w: int) -> np.ndarray:
        """Global token ids of window w of the current epoch, in shuffled order."""
        if w not in self._windows:
            p, ci = len(self.positions), self.chunk_images
            chunks = self._order[w * self.window_chunks: (w + 1) * self.window_chunks]
            ids = np.concatenate([np.arange(c * ci * p, min((c + 1) * ci, self.cache.n_images) * p) for c in chunks])
            rng = np.random.default_rng([self.seed, self._epoch, w + 1])
            self._windows = {w: ids[rng.permutation(len(ids))], **{k: v for k, v in self._windows.items() if k == w - 1}}
        return self._windows[w]

    def _batch_ids(self, epoch: int, b: int, batch_size: int) -> np.ndarray:
        self._plan(epoch)
        lo, hi = b * batch_size, min((b + 1) * batch_size, self.n_tokens)
        starts, parts = self._window_starts, []
        w = int(np.searchsorted(starts, lo, side="right") - 1)
        while lo < hi:
            end = min(hi, int(starts[w + 1]))
            parts.append(self._window(w)[lo - starts[w]: end - starts[w]])
            lo, w = end, w + 1
        return np.concatenate(parts)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.n_tokens // batch_size)

    def sample(self, n: int) -> torch.Tensor:
        """A fixed random sample of n tokens (independent of the training order)."""
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        return self._gather(np.sort(rng.choice(self.n_tokens, size=min(n, self.n_tokens), replace=False)))

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world: int = 1,
                with_cls: bool = False) -> Iterator[torch.Tensor]:
        """Global batch s is tokens s*batch_size.. of the epoch's order (the epoch's last batch may be short);
        rank r of `world` gets the r-th of `world` near-equal parts of it, in token-id order. with_cls: yield
        (x_ND, cls_N), cls_N marking the CLS rows."""
        per_epoch = self.steps_per_epoch(batch_size)
        step = start_step
        while True:
            epoch, b = divmod(step, per_epoch)
            ids = np.array_split(np.sort(self._batch_ids(epoch, b, batch_size)), world)[rank]
            x_ND = self._gather(ids)
            yield (x_ND, torch.from_numpy(self.cls_P[ids % len(self.positions)])) if with_cls else x_ND
            step += 1


class StreamedTokens:
    """On-the-fly extraction with no cache: each step runs the model on a deterministic set of images and
    takes a shuffled selection of their tokens. Slower per token; for one-off runs and huge datasets."""

    def __init__(self, model, ds, layer: int, tokens: str = "all", seed: int = 0, images_per_step: int = 0,
                 dtype: str = "fp32", workers: int = 0):
        self.model, self.ds, self.layer, self.seed = model, ds, model.resolve_layer(layer), seed
        self.dtype, self.workers = check_dtype(dtype), workers  # forward precision, image-decoding processes
        self.positions = token_positions(model.layout().kinds(), tokens)
        self.cls_P = cls_positions(model.layout().kinds(), self.positions)
        self.n_tokens = len(ds) * len(self.positions)
        self.images_per_step = images_per_step

    def _tokens_of(self, indices) -> torch.Tensor:
        from patchsae.data.base import iter_batches

        out = []
        for pixels, _, _ in iter_batches(self.ds, self.model.preprocess, 256, indices, workers=self.workers,
                                         pin_memory=self.model.device.type == "cuda"):
            with torch.no_grad(), autocast(self.dtype, self.model.device):
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

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world: int = 1,
                with_cls: bool = False) -> Iterator[torch.Tensor]:
        """Each step takes the next n_img images of the epoch's permutation (the epoch's remainder is
        dropped, so every batch is full); a step that lost images to decode errors is topped up from the
        images after the epoch's last full step. One process only (world 1). with_cls: yield (x_ND, cls_N)."""
        if world != 1:
            raise PatchSAEError("on-the-fly extraction trains in one process; cache first to train on several")
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
            x_ND = x_ND[torch.from_numpy(pick)]
            # rows come image by image in `positions` order, so row i is selected position i % per_image
            yield (x_ND, torch.from_numpy(self.cls_P[pick % per_image])) if with_cls else x_ND
            step += 1

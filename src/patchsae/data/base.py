"""The dataset contract every stage relies on, and batching that survives unreadable images.

A dataset is any object with `name`, `split`, `class_names`, `__len__` and `load(i) -> (PIL image, label)`;
`i` is the dataset index, which every later stage stores so results point back to the original image.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator, Protocol, Sequence

import torch
from PIL import Image

from patchsae import PatchSAEError


MAX_PIXELS = 40_000_000  # images declaring more pixels are refused before decoding (decompression bombs)


class ImageTooLarge(ValueError):
    """An image declaring more than MAX_PIXELS pixels."""


def open_image(source: str | Path | IO[bytes]) -> Image.Image:
    """A decoded image from a file or stream; one that declares more than MAX_PIXELS pixels is refused from its
    header, before any pixel is decoded (a 100-byte PNG can declare 65535 x 65535: 12 GB as RGB). PIL's own
    bomb check starts only at ~179 M pixels and warns below that."""
    with Image.open(source) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ImageTooLarge(f"image of {w}x{h} pixels is larger than the {MAX_PIXELS:,} pixels allowed")
        im.load()
        return im.copy()


class LabelledImages(Protocol):
    name: str
    split: str
    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def load(self, i: int) -> tuple[Image.Image, int]: ...


class GrayArrays:
    """A dataset held as arrays: 8-bit grayscale images (N, H, W) and int64 labels (N,); subclasses set `name`,
    `class_names`, `split`, `images` and `labels`."""

    name: str
    split: str
    class_names: Sequence[str]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L"), int(self.labels[i])


@dataclass
class SkipLog:
    """Counts images that could not be decoded; a long run reports them instead of crashing."""

    skipped: list[tuple[int, str]] = field(default_factory=list)

    def add(self, index: int, reason: str) -> None:
        if len(self.skipped) < 5:
            print(f"warning: skipping image {index}: {reason}", file=sys.stderr)
        self.skipped.append((index, reason))

    @property
    def count(self) -> int:
        return len(self.skipped)


def check_not_empty(ds: LabelledImages) -> None:
    if len(ds) == 0:
        raise PatchSAEError(f"dataset {ds.name!r} split {ds.split!r} has no images")


def iter_batches(
    ds: LabelledImages,
    preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
    batch_size: int,
    indices: Sequence[int] | None = None,
    skips: SkipLog | None = None,
    progress: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (pixels_BCHW, labels_B, indices_B) in dataset order, skipping images that fail to decode."""
    from tqdm.auto import tqdm

    check_not_empty(ds)
    skips = skips if skips is not None else SkipLog()
    order = range(len(ds)) if indices is None else indices
    bar = tqdm(total=len(order), desc=progress, unit="img", disable=progress is None, leave=False)
    images, labels, idx = [], [], []
    for i in order:
        i = int(i)
        try:
            img, label = ds.load(i)
            pixels = preprocess([img])
        except PatchSAEError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decode failure of one file must not end the run
            skips.add(i, f"{type(exc).__name__}: {exc}")
        else:
            images.append(pixels[0])
            labels.append(label)
            idx.append(i)
        bar.update(1)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels), torch.tensor(idx)
            images, labels, idx = [], [], []
    bar.close()
    if images:
        yield torch.stack(images), torch.tensor(labels), torch.tensor(idx)
    if skips.count and progress is not None:
        print(f"warning: skipped {skips.count} unreadable image(s) of {len(order)}", file=sys.stderr)


class FirstN:
    """The first n images of a dataset (for quick runs); indices are unchanged."""

    def __init__(self, ds: LabelledImages, n: int | None):
        self.ds, self.n = ds, len(ds) if n is None else min(n, len(ds))
        self.name, self.split, self.class_names = ds.name, ds.split, ds.class_names

    def __len__(self) -> int:
        return self.n

    def load(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds.load(i)

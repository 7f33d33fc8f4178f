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
import torch.utils.data
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
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (pixels_BCHW, labels_B, indices_B) in dataset order, skipping images that fail to decode.

    workers > 0 decodes and preprocesses in that many DataLoader worker processes (so a GPU is not starved by
    PIL) and yields the very same batches; pin_memory (with CUDA present) puts them in page-locked memory for
    asynchronous copies to the GPU."""
    from tqdm.auto import tqdm

    check_not_empty(ds)
    skips = skips if skips is not None else SkipLog()
    order = range(len(ds)) if indices is None else indices
    bar = tqdm(total=len(order), desc=progress, unit="img", disable=progress is None, leave=False)
    if workers < 0:
        raise PatchSAEError(f"--workers must be 0 or more, not {workers}")
    if workers > 0:
        yield from _worker_batches(ds, preprocess, batch_size, order, skips, bar, workers, pin_memory)
        _report_skips(skips, len(order), progress)
        return
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
    _report_skips(skips, len(order), progress)


def _report_skips(skips: SkipLog, n: int, progress: str | None) -> None:
    if skips.count and progress is not None:
        print(f"warning: skipped {skips.count} unreadable image(s) of {n}", file=sys.stderr)


class _DecodedChunks(torch.utils.data.Dataset):
    """Chunk c of `order`, decoded and preprocessed in a worker: (pixels or None, labels, indices, failures),
    a failure being (index, reason, fatal). A PatchSAEError travels back as data, so the main process raises
    it with its own message rather than DataLoader's wrapped traceback."""

    def __init__(self, ds, preprocess, order: Sequence[int], chunk: int):
        self.ds, self.preprocess, self.order, self.chunk = ds, preprocess, order, chunk

    def __len__(self) -> int:
        return -(-len(self.order) // self.chunk)

    def __getitem__(self, c: int):
        pixels, labels, idx, failed = [], [], [], []
        for i in self.order[c * self.chunk: (c + 1) * self.chunk]:
            i = int(i)
            try:
                img, label = self.ds.load(i)
                pixels.append(self.preprocess([img])[0])
            except PatchSAEError as exc:
                failed.append((i, str(exc), True))
                break
            except Exception as exc:  # noqa: BLE001 - as in iter_batches: one bad file must not end the run
                failed.append((i, f"{type(exc).__name__}: {exc}", False))
            else:
                labels.append(label)
                idx.append(i)
        return (torch.stack(pixels) if pixels else None), torch.tensor(labels, dtype=torch.long), \
            torch.tensor(idx, dtype=torch.long), failed


def _worker_batches(ds, preprocess, batch_size, order, skips, bar, workers, pin_memory):
    """iter_batches' batches from chunks of batch_size images decoded in worker processes: a chunk without
    unreadable images is yielded as it came (pinned by the loader), others are re-cut to batch_size."""
    pin = pin_memory and torch.cuda.is_available()
    loader = torch.utils.data.DataLoader(_DecodedChunks(ds, preprocess, order, batch_size), batch_size=None,
                                         num_workers=workers, pin_memory=pin, prefetch_factor=2)
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for pixels, labels, idx, failed in loader:
        for i, reason, fatal in failed:
            if fatal:
                raise PatchSAEError(reason)
            skips.add(i, reason)
        bar.update(len(idx) + len(failed))
        if pixels is None:
            continue
        if not pending and len(idx) == batch_size:
            yield pixels, labels, idx
            continue
        pending.append((pixels, labels, idx))
        while sum(len(p[2]) for p in pending) >= batch_size:
            batch, pending = _cut(pending, batch_size)
            yield batch
    bar.close()
    if pending:
        yield tuple(torch.cat(parts) for parts in zip(*pending))


def _cut(parts: list, n: int) -> tuple[tuple, list]:
    """The first n rows of a list of (pixels, labels, indices) pieces, and the rest."""
    cat = [torch.cat(t) for t in zip(*parts)]
    return tuple(t[:n] for t in cat), [tuple(t[n:] for t in cat)] if len(cat[2]) > n else []


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

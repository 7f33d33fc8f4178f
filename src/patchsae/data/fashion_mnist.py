"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files, gzip)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from patchsae import PatchSAEError
from patchsae.data.base import GrayArrays

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise PatchSAEError(f"{path}: not an IDX file with {ndim} dimensions (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise PatchSAEError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} bytes)")
    return data.reshape(dims)


def load_arrays(split: str, root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Return (images_N28x28 uint8, labels_N int64) for 'train' (60,000) or 'test' (10,000)."""
    if split not in _FILES:
        raise PatchSAEError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    root = Path(root)
    img_file, lbl_file = (root / name for name in _FILES[split])
    if not img_file.exists():
        raise PatchSAEError(
            f"Fashion-MNIST not found at {root}; install it with `apt-get install dataset-fashion-mnist`"
        )
    return _read_idx(img_file, 3).copy(), _read_idx(lbl_file, 1).astype(np.int64)


class FashionMNIST(GrayArrays):
    """The embedded dataset: Fashion-MNIST 'train' (60,000) or 'test' (10,000), 28x28 grayscale."""

    name = "fashion-mnist"
    class_names = CLASS_NAMES

    def __init__(self, split: str = "train", root: str | Path = DEFAULT_ROOT):
        self.split = split
        self.images, self.labels = load_arrays(split, root)

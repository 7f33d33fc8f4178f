"""scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1,797 images of 8 x 8 pixels, 0..16 ink,
shipped inside the scikit-learn wheel): the adaptation study's task far from the embedded model's training data.

Splits: 'train' = the first 1,000 images, 'test' = the other 797 (the file is ordered by writer, so the two
splits share few writers). Images are returned at 8 x 8 (ink white on black, as in Fashion-MNIST); a model's
preprocessing upscales them to its input size. Class names are the words "zero" .. "nine", so that a prompt reads
"a photo of a seven."
"""

from __future__ import annotations

import numpy as np

from patchsae import PatchSAEError
from patchsae.data.base import GrayArrays

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
N_TRAIN = 1000


class Digits(GrayArrays):
    name = "digits"
    class_names = CLASS_NAMES

    def __init__(self, split: str = "train"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise PatchSAEError("the digits dataset needs scikit-learn (pip install scikit-learn)") from None
        if split not in ("train", "test"):
            raise PatchSAEError(f"digits has splits 'train' and 'test', not {split!r}")
        data = load_digits()
        part = slice(0, N_TRAIN) if split == "train" else slice(N_TRAIN, None)
        self.split = split
        self.images = np.round(data.images[part] * (255.0 / 16.0)).astype(np.uint8)
        self.labels = data.target[part].astype(np.int64)

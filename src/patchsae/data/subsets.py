"""Class subsets and few-shot samples of a dataset (MaPLe's base-to-novel protocol)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from patchsae import PatchSAEError
from patchsae.data.base import LabelledImages


def dataset_labels(ds: LabelledImages) -> np.ndarray:
    """The label of every image, without decoding images where the dataset keeps its labels apart."""
    if hasattr(ds, "labels"):
        return np.asarray(ds.labels, dtype=np.int64)
    if hasattr(ds, "files"):  # ImageFolder
        return np.asarray([label for _, label in ds.files], dtype=np.int64)
    if hasattr(ds, "ds") and hasattr(ds, "label_column"):  # HFImages
        return np.asarray(ds.ds[ds.label_column], dtype=np.int64)
    return np.asarray([ds.load(i)[1] for i in range(len(ds))], dtype=np.int64)


def resolve_class_list(wanted: Sequence[str], class_names: Sequence[str], what: str) -> list[int]:
    """Class names or integer ids -> ids, or one clear error."""
    out = []
    for w in wanted:
        w = str(w)
        if w in class_names:
            out.append(list(class_names).index(w))
        elif w.isdigit() and int(w) < len(class_names):
            out.append(int(w))
        else:
            raise PatchSAEError(f"unknown class {w!r} in {what}; the dataset's classes are {list(class_names)}")
    if len(set(out)) != len(out):
        raise PatchSAEError(f"{what} names a class twice")
    return out


class ClassSubset:
    """The images of some classes of `ds`, relabelled 0..len(classes)-1 in the given order (so a classifier
    over just those classes can be evaluated with the usual code). `index_of(i)` gives the original index."""

    def __init__(self, ds: LabelledImages, classes: Sequence[int], labels: np.ndarray | None = None):
        labels = dataset_labels(ds) if labels is None else labels
        self.ds, self.classes = ds, list(classes)
        self.indices = np.flatnonzero(np.isin(labels, self.classes))
        self._map = {c: j for j, c in enumerate(self.classes)}
        self.name, self.split = ds.name, ds.split
        self.class_names = tuple(ds.class_names[c] for c in self.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def index_of(self, i: int) -> int:
        return int(self.indices[i])

    def load(self, i: int):
        img, label = self.ds.load(int(self.indices[i]))
        return img, self._map[int(label)]


def few_shot_indices(labels: np.ndarray, classes: Sequence[int], shots: int, seed: int) -> np.ndarray:
    """`shots` images per class drawn without replacement (seeded), sorted; every class must have that many."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            raise PatchSAEError(f"class {c} has {len(pool)} images, fewer than --shots {shots}")
        picked.append(rng.choice(pool, size=shots, replace=False))
    return np.sort(np.concatenate(picked))

"""Datasets: (image, label) by index, with class names. `open_dataset` picks the kind from the spec."""

from __future__ import annotations

from pathlib import Path

from patchsae import PatchSAEError
from patchsae.data.base import LabelledImages, SkipLog, iter_batches

__all__ = ["LabelledImages", "SkipLog", "iter_batches", "open_dataset"]


def open_dataset(spec: str, split: str, path: str | None = None, **hf_kwargs) -> LabelledImages:
    """`fashion-mnist` (embedded), `digits` (scikit-learn's 8x8 digits), a registry name (`patchsae datasets`), a
    folder of class subfolders, a `save_to_disk` folder, or `hf:NAME`. `path` (--dataset-path) is a local copy of
    the named dataset: a registry entry keeps its class names; any other spec is simply replaced by the folder."""
    from patchsae.data.registry import lookup, open_registered

    info = lookup(spec)
    if info is not None:
        return open_registered(info, split, path, **hf_kwargs)
    if path is not None:
        if not Path(path).is_dir():
            raise PatchSAEError(f"--dataset-path {path}: no such folder")
        return open_dataset(str(path), split, **hf_kwargs)
    if spec in ("fashion-mnist", "embedded"):
        from patchsae.data.fashion_mnist import FashionMNIST

        return FashionMNIST(split)
    if spec in ("digits", "sklearn-digits"):
        from patchsae.data.digits import Digits

        return Digits(split)
    if spec.startswith("hf:"):
        from patchsae.data.hf import HFImages

        return HFImages(spec[3:], split, **hf_kwargs)
    path = Path(spec)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            from patchsae.data.hf import HFImages

            return HFImages(str(path), split, **hf_kwargs)
        from patchsae.data.folder import ImageFolder

        split_dir = path / split
        return ImageFolder(split_dir if split_dir.is_dir() else path, split)
    raise PatchSAEError(
        f"unknown dataset {spec!r}: use 'fashion-mnist', a name from `patchsae datasets`, a folder of class "
        "subfolders, a datasets save_to_disk folder, or hf:NAME"
    )

"""Hugging Face `datasets`: a hub name or a local `save_to_disk` folder, with image and label columns."""

from __future__ import annotations

from pathlib import Path

from patchsae import PatchSAEError


class HubUnreachable(PatchSAEError):
    """The hub could not be reached (offline, no network); the registry turns it into a pointer to a local copy."""


def _pick_column(features, wanted: str | None, kind: str) -> str:
    from datasets import ClassLabel, Image as HFImage

    if wanted:
        if wanted not in features:
            raise PatchSAEError(f"column {wanted!r} not in dataset (columns: {', '.join(features)})")
        return wanted
    typ = HFImage if kind == "image" else ClassLabel
    for name, feat in features.items():
        if isinstance(feat, typ):
            return name
    for name in (("image", "img") if kind == "image" else ("label", "labels", "fine_label")):
        if name in features:
            return name
    raise PatchSAEError(f"cannot find the {kind} column (columns: {', '.join(features)}); name it explicitly")


class HFImages:
    def __init__(self, source: str, split: str = "train", image_column: str | None = None,
                 label_column: str | None = None, class_names: list[str] | None = None):
        import datasets

        self.name, self.split = source, split
        path = Path(source)
        try:
            if path.exists():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(source, split=split)
        except FileNotFoundError as exc:
            raise PatchSAEError(f"{source}: not a dataset saved with save_to_disk ({exc})") from None
        except (ConnectionError, OSError) as exc:
            raise HubUnreachable(
                f"cannot load dataset {source!r} from the Hugging Face hub ({type(exc).__name__}); "
                "download it elsewhere and pass the local save_to_disk folder instead"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PatchSAEError(f"{source} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
        self.ds = ds
        self.image_column = _pick_column(ds.features, image_column, "image")
        self.label_column = _pick_column(ds.features, label_column, "label")
        feat = ds.features[self.label_column]
        if class_names:
            self.class_names = tuple(class_names)
        elif hasattr(feat, "names"):
            self.class_names = tuple(feat.names)
        else:
            n = int(max(ds[self.label_column])) + 1 if len(ds) else 0
            self.class_names = tuple(str(i) for i in range(n))
        # decode lazily and per row, so one corrupt image fails alone
        self._rows = ds.cast_column(self.image_column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int):
        import io

        from patchsae.data.base import open_image

        row = self._rows[i]
        img = row[self.image_column]
        if isinstance(img, dict):
            data = img.get("bytes")
            return open_image(io.BytesIO(data) if data is not None else img["path"]), int(row[self.label_column])
        img.load()
        return img, int(row[self.label_column])

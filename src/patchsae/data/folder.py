"""Image folders: one subfolder per class (sorted names = class ids), images anywhere below it."""

from __future__ import annotations

from pathlib import Path

from patchsae import PatchSAEError
from patchsae.data.base import open_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageFolder:
    def __init__(self, root: str | Path, split: str = "all"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise PatchSAEError(f"image folder {self.root} does not exist")
        self.name = str(self.root)
        self.split = split
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise PatchSAEError(f"image folder {self.root} has no class subfolders (expected ROOT/CLASS/IMAGE)")
        self.class_names = tuple(classes)
        self.files: list[tuple[Path, int]] = []
        for label, cls in enumerate(classes):
            for f in sorted((self.root / cls).rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    self.files.append((f, label))

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int):
        path, label = self.files[i]
        return open_image(path), label

"""The datasets of the paper by name: Hugging Face ids, columns, splits, sizes and shipped class names.

`open_dataset("eurosat", split)` looks a name up here; `--dataset-path DIR` points the same entry at a local copy
(a `save_to_disk` folder or an image folder of class subfolders), which is how these datasets run with no hub.
Class names come from classnames/<file>.txt (written by scripts/make_classnames.py, which names its sources): they
are the prompt-ready names CLIP evaluations use, so they replace the dataset's own label names when the counts
agree and fill in for datasets whose labels are bare integers.

Hub ids: `verified` marks ids whose dataset card (columns, splits) we read; the others are the usual community
copies, named from memory and unchecked here, which is why every entry accepts a local copy.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from patchsae import PatchSAEError

CLASSNAMES_DIR = Path(__file__).parent / "classnames"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    hf_id: str | None  # None: no image version known on the hub; --dataset-path only
    splits: tuple[str, ...]
    classnames: str  # file stem under classnames/
    n_classes: int
    image_column: str = "image"
    label_column: str = "label"
    sizes: dict = field(default_factory=dict)  # images per split, where known (for budgets)
    verified: bool = False

    @property
    def class_names(self) -> tuple[str, ...]:
        return load_class_names(self.classnames)


REGISTRY: dict[str, DatasetInfo] = {d.name: d for d in (
    # ILSVRC/imagenet-1k is gated: accept its terms on the hub and log in, or use --dataset-path
    DatasetInfo("imagenet-1k", "ImageNet-1k (ILSVRC 2012)", "ILSVRC/imagenet-1k", ("train", "validation", "test"),
                "imagenet-1k", 1000, sizes={"train": 1_281_167, "validation": 50_000, "test": 100_000}),
    DatasetInfo("imagenet-sketch", "ImageNet-Sketch", "songweig/imagenet_sketch", ("train",), "imagenet-1k", 1000,
                sizes={"train": 50_889}),
    DatasetInfo("flowers102", "Oxford Flowers 102", "dpdl-benchmark/oxford_flowers102",
                ("train", "validation", "test"), "flowers102", 102,
                sizes={"train": 1_020, "validation": 1_020, "test": 6_149}),
    # clip_benchmark's 102 names include 'background' and both face classes; CoOp/MaPLe drop two (100 classes)
    DatasetInfo("caltech101", "Caltech101", "dpdl-benchmark/caltech101", ("train", "test"), "caltech101", 102),
    DatasetInfo("eurosat", "EuroSAT (RGB)", "timm/eurosat-rgb", ("train", "validation", "test"), "eurosat", 10,
                sizes={"train": 16_200, "validation": 5_400, "test": 5_400}, verified=True),
    DatasetInfo("dtd", "Describable Textures (DTD)", "tanganke/dtd", ("train", "test"), "dtd", 47,
                sizes={"train": 3_760, "test": 1_880}, verified=True),
    DatasetInfo("oxford-pets", "Oxford-IIIT Pets", "timm/oxford-iiit-pet", ("train", "test"), "oxford-pets", 37,
                sizes={"train": 3_680, "test": 3_669}),
    DatasetInfo("food101", "Food-101", "ethz/food101", ("train", "validation"), "food101", 101,
                sizes={"train": 75_750, "validation": 25_250}),
    DatasetInfo("stanford-cars", "Stanford Cars", "tanganke/stanford_cars", ("train", "test"), "stanford-cars", 196,
                sizes={"train": 8_144, "test": 8_041}),
    DatasetInfo("fgvc-aircraft", "FGVC Aircraft (variants)", "Donghyun99/FGVC-Aircraft", ("train", "test"),
                "fgvc-aircraft", 100),
    DatasetInfo("sun397", "SUN397", "tanganke/sun397", ("train", "test"), "sun397", 397),
    # CoOp/MaPLe use the middle frame of each clip (UCF-101-midframes); no image version is known on the hub
    DatasetInfo("ucf101", "UCF101 (middle frames)", None, ("train", "test"), "ucf101", 101),
)}

ALIASES = {"imagenet": "imagenet-1k", "imagenet1k": "imagenet-1k", "flowers": "flowers102", "pets": "oxford-pets",
           "cars": "stanford-cars", "aircraft": "fgvc-aircraft", "food": "food101", "caltech": "caltech101"}


def lookup(name: str) -> DatasetInfo | None:
    """The registry entry for a name or alias (case-insensitive), or None for other dataset specs."""
    key = name.lower()
    return REGISTRY.get(ALIASES.get(key, key))


@lru_cache(maxsize=None)
def load_class_names(stem: str) -> tuple[str, ...]:
    path = CLASSNAMES_DIR / f"{stem}.txt"
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def base_novel_split(n_classes: int) -> tuple[list[int], list[int]]:
    """MaPLe/CoOp base-to-novel: the first ceil(n/2) class indices are base, the rest novel."""
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def _local_hint(info: DatasetInfo) -> str:
    return (f"point at a local copy with --dataset-path DIR (a datasets save_to_disk folder or an image folder "
            f"of class subfolders) for {info.name!r}")


def open_registered(info: DatasetInfo, split: str, path: str | None = None, **hf_kwargs):
    """Open a registry dataset from `path` if given, else from the hub, and apply the shipped class names."""
    from patchsae.data.hf import HFImages, HubUnreachable

    if path is not None:
        from patchsae.data import open_dataset

        if not Path(path).exists():
            raise PatchSAEError(f"--dataset-path {path} does not exist; {_local_hint(info)}")
        ds = open_dataset(str(path), split, **hf_kwargs)
    elif info.hf_id is None:
        raise PatchSAEError(f"{info.name} has no hub copy; {_local_hint(info)}")
    else:
        try:
            # unverified ids: let the loader find the image and ClassLabel columns itself
            cols = {"image_column": info.image_column, "label_column": info.label_column} if info.verified else {}
            ds = HFImages(info.hf_id, split, **{**cols, **hf_kwargs})
        except HubUnreachable:
            raise PatchSAEError(f"cannot reach the Hugging Face hub for {info.name} ({info.hf_id}); "
                                f"{_local_hint(info)}") from None
    return _with_class_names(ds, info)


def _with_class_names(ds, info: DatasetInfo):
    names = info.class_names
    own = tuple(ds.class_names)
    bare = all(str(n).isdigit() for n in own)
    if len(own) == len(names) or (bare and len(own) <= len(names)):
        ds.class_names = names
    else:
        print(f"warning: {info.name}: the data has {len(own)} classes, the registry {len(names)}; "
              "keeping the data's own class names", file=sys.stderr)
    return ds


def format_table() -> str:
    """The `patchsae datasets` listing: name, hub id, splits, number of classes."""
    rows = [("name", "hugging face id", "splits", "classes")]
    for d in REGISTRY.values():
        hub = (d.hf_id or "(local only: --dataset-path)") + ("" if d.verified or d.hf_id is None else " *")
        rows.append((d.name, hub, ",".join(d.splits), str(d.n_classes)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>7}" for r in rows]
    lines.append("* hub id not checked against its dataset card; any entry takes --dataset-path DIR "
                 "(a save_to_disk folder or an image folder)")
    return "\n".join(lines)
